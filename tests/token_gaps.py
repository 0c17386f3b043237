"""What each module lacks, measured by its conformance run: a skip names its gap.

One row per module the conformance suite runs on (``scripts/conformance.sh``,
docs/tokens.md). A key type or mechanism listed here is skipped with the
reason given; one not listed must work, and one listed that works fails the
run (the table must stay true).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from hsmbridge import Mechanism

#: The PKCS#11 module the suite runs on: SoftHSM2 (a session token made here) unless
#: scripts/conformance.sh started another and names it (its URI in HSMBRIDGE_HSM).
TOKEN = os.environ.get("HSMBRIDGE_TEST_TOKEN", "softhsm2")


@dataclass(frozen=True)
class Gaps:
    #: conformance key names (rsa2048, p256, ...) the module cannot generate
    specs: dict[str, str] = field(default_factory=dict)
    #: mechanisms the module refuses
    mechanisms: dict[Mechanism, str] = field(default_factory=dict)
    #: why a corrupt ciphertext is not reported as DecryptionFailed
    corrupt_ciphertext: str | None = None
    #: why keys may carry usages not asked for
    extra_usages: str | None = None
    #: why a key that failed a decryption cannot be deleted in the same process
    delete_after_failed_decrypt: str | None = None
    #: why one-time keys (hsmbridge.onetime) do not work on the module
    one_time_keys: str | None = None


_SOFTHSM_OAEP = "SoftHSM2 2.6.1 implements RSA-OAEP with SHA-1 only"
SOFTHSM2 = Gaps(
    mechanisms={
        Mechanism.RSA_OAEP_SHA256: _SOFTHSM_OAEP,
        Mechanism.RSA_OAEP_SHA384: _SOFTHSM_OAEP,
        Mechanism.RSA_OAEP_SHA512: _SOFTHSM_OAEP,
    }
)
_OCK_EC = "opencryptoki 3.8's software token has no EC (no CKM_EC_KEY_PAIR_GEN)"
_TPM_EC = (
    "tpm2-pkcs11 1.9 (Debian 12) fails EC key generation: CKR_GENERAL_ERROR, "
    "'User specified and TPM specified attr mismatch'"
)
_TPM_RSA = "a TPM 2.0 (swtpm/libtpms) generates RSA keys up to 3072 bits"
_NOT_KEPT = "it cannot keep a key to raw decryption, so hsmbridge makes no rsa-raw key there"
_NO_ED25519 = "no Ed25519 in this module (no CKM_EC_EDWARDS_KEY_PAIR_GEN)"

GAPS: dict[str, Gaps] = {
    "softhsm2": SOFTHSM2,
    "p11-kit-proxy": SOFTHSM2,  # SoftHSM2 behind p11-kit
    "p11-kit-client": Gaps(
        specs={"ed25519": "p11-kit 0.24's RPC (client to server) does not carry EdDSA mechanisms"},
        mechanisms=SOFTHSM2.mechanisms,
    ),
    "nethsm": SOFTHSM2,  # hsmbridge serve over SoftHSM2
    "opencryptoki": Gaps(
        specs={"p256": _OCK_EC, "p384": _OCK_EC, "p521": _OCK_EC, "ed25519": _NO_ED25519},
        mechanisms={
            Mechanism.RSA_RAW: (
                "opencryptoki 3.8 has CKM_RSA_X_509 but, a PKCS#11 2.20 module, no "
                f"CKA_ALLOWED_MECHANISMS (CKR_ATTRIBUTE_TYPE_INVALID): {_NOT_KEPT}"
            )
        },
    ),
    "tpm2": Gaps(
        specs={
            "rsa4096": _TPM_RSA,
            "p256": _TPM_EC,
            "p384": _TPM_EC,
            "p521": _TPM_EC,
            "ed25519": _NO_ED25519,
        },
        corrupt_ciphertext=(
            "tpm2-pkcs11 answers bad padding with CKR_GENERAL_ERROR, the code of its own "
            "failures too, so hsmbridge does not blame the ciphertext (HSMError)"
        ),
        extra_usages=(
            "tpm2-pkcs11 refuses templates that set usages false; keys get the TPM's "
            "defaults (sign and decrypt)"
        ),
        mechanisms={
            Mechanism.RSA_RAW: (
                "tpm2-pkcs11 1.9 has CKM_RSA_X_509 but mis-enforces CKA_ALLOWED_MECHANISMS "
                f"(hsmbridge leaves it out there): {_NOT_KEPT}"
            )
        },
        delete_after_failed_decrypt=(
            "after a failed RSA-OAEP decryption tpm2-pkcs11 1.9 keeps the key marked in "
            "use: C_DestroyObject answers CKR_FUNCTION_FAILED until the process ends"
        ),
        one_time_keys=(
            "one-time keys refill in a background thread, and tpm2-pkcs11 fails with two "
            "sessions used at once (issue #843): refused up front with ConfigurationError"
        ),
    ),
    "nss": Gaps(
        specs={"ed25519": _NO_ED25519},
        mechanisms={
            Mechanism.RSA_RAW: (
                "NSS softokn 3.87 has CKM_RSA_X_509 but refuses CKA_ALLOWED_MECHANISMS "
                f"(CKR_GENERAL_ERROR): {_NOT_KEPT}"
            )
        },
        one_time_keys=(
            "NSS softokn refuses hsmbridge's CKO_DATA records (C_CreateObject: "
            "CKR_ATTRIBUTE_VALUE_INVALID), where one-time keys keep their tickets"
        ),
    ),
}
