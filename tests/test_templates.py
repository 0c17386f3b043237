"""How key templates step down, and what a module is remembered to refuse.

The generate function here stands in for C_GenerateKeyPair so that a passing
failure can be injected at an exact moment (no real token fails on cue); the
real step-downs are exercised by the conformance suite on tpm2-pkcs11 and NSS.
"""

from __future__ import annotations

from typing import Any

import pkcs11.exceptions as p11x
import pytest

from hsmbridge import HSMError
from hsmbridge.pkcs11.templates import (
    FALLBACKS,
    Template,
    TemplateQuirks,
    generate_with_templates,
    keeps_mechanisms,
)

USAGE = frozenset({"sign"})


class Module:
    """Answers each call with the next scripted error, then with the step's index."""

    def __init__(self, *errors: type[Exception] | None) -> None:
        self.errors = list(errors)
        self.calls: list[Template] = []

    def __call__(self, public: Template, private: Template) -> Any:
        self.calls.append(private)
        error = self.errors.pop(0) if self.errors else None
        if error is not None:
            raise error()
        return len(self.calls)


def generate(module: Module, quirks: TemplateQuirks) -> Any:
    return generate_with_templates(
        module, b"\x01", "k", USAGE, [], quirks, what="generating key 'k'"
    )


def test_one_passing_general_error_does_not_step_down() -> None:
    quirks = TemplateQuirks()
    module = Module(p11x.GeneralError)
    generate(module, quirks)
    assert (quirks.step, quirks.learned, quirks.refused) == (0, True, None)
    assert keeps_mechanisms(quirks)
    assert len(module.calls) == 2  # the same full template, twice


@pytest.mark.parametrize("error", [p11x.GeneralError, p11x.FunctionFailed])
def test_a_repeated_ambiguous_refusal_steps_down_and_is_remembered(
    error: type[Exception],
) -> None:
    quirks = TemplateQuirks()
    generate(Module(error, error), quirks)
    assert quirks.step == 1 and quirks.refused and error.__name__ in quirks.refused
    assert not keeps_mechanisms(quirks)
    later = Module()
    generate(later, quirks)  # starts where the module was learned to need
    assert len(later.calls) == 1


def test_a_definite_refusal_steps_down_at_once() -> None:
    quirks = TemplateQuirks()
    module = Module(p11x.AttributeTypeInvalid)
    generate(module, quirks)
    assert quirks.step == 1 and len(module.calls) == 2


def test_every_template_refused_names_the_refusals() -> None:
    quirks = TemplateQuirks()
    module = Module(*[p11x.TemplateInconsistent] * len(FALLBACKS))
    with pytest.raises(HSMError, match=r"refused every key template.*TemplateInconsistent"):
        generate(module, quirks)
    assert not quirks.learned


def test_other_errors_are_not_refusals() -> None:
    quirks = TemplateQuirks()
    with pytest.raises(HSMError):
        generate(Module(p11x.DeviceMemory), quirks)
    assert (quirks.step, quirks.learned) == (0, False)
