"""The JSON result's schema (JSON Schema, draft 2020-12), documented in docs/benchmarks.md.

The tests validate every result they make against it; ``compare`` checks the
``schema`` identifier before reading a file. A change of the format that
readers would notice bumps the identifier.
"""

from __future__ import annotations

from typing import Any

SCHEMA_ID = "hsmbridge-bench/1"

_NUM = {"type": "number"}
_STATS = {
    "type": "object",
    "required": ["median", "min", "max", "spread"],
    "properties": {"median": _NUM, "min": _NUM, "max": _NUM, "spread": _NUM},
}
_ROUND = {
    "type": "object",
    "required": ["round", "ops", "seconds", "cpu_seconds", "ops_per_s", "cpu_us_per_op"],
    "properties": {
        "round": {"type": "integer", "minimum": 0},
        "ops": {"type": "integer", "minimum": 1},
        "seconds": _NUM,
        "cpu_seconds": _NUM,
        "ops_per_s": _NUM,
        "cpu_us_per_op": _NUM,
    },
}
_LATENCY = {
    "type": ["object", "null"],
    "required": ["samples", "p50", "p95", "p99", "quantiles"],
    "properties": {
        "samples": {"type": "integer", "minimum": 1},
        "p50": _NUM,
        "p95": _NUM,
        "p99": _NUM,
        "quantiles": {"type": "array", "items": _NUM, "minItems": 21, "maxItems": 21},
    },
}
_RESULT = {
    "type": "object",
    "required": [
        "contender", "threads", "count", "rounds", "ops_per_s", "cpu_us_per_op", "latency_us",
    ],
    "properties": {
        "contender": {"type": "string"},
        "threads": {"type": "integer", "minimum": 1},
        "count": {"type": "integer", "minimum": 1},
        "rounds": {"type": "array", "items": _ROUND, "minItems": 1},
        "ops_per_s": _STATS,
        "cpu_us_per_op": _STATS,
        "latency_us": _LATENCY,
    },
}  # fmt: skip
_RATIO = {
    "type": "object",
    "required": ["contender", "over", "threads", "ops_per_s", "cpu_per_op"],
    "properties": {
        "contender": {"type": "string"},
        "over": {"type": "string"},
        "threads": {"type": "integer"},
        "ops_per_s": _STATS,
        "cpu_per_op": {"oneOf": [_STATS, {"type": "null"}]},
    },
}
_WORKLOAD = {
    "type": "object",
    "required": ["name", "kind", "key", "mechanism", "skipped", "results", "ratios"],
    "properties": {
        "name": {"type": "string"},
        "kind": {"enum": ["sign", "decrypt", "keygen"]},
        "key": {"type": "string"},
        "mechanism": {"type": ["string", "null"]},
        "skipped": {"type": ["string", "null"]},
        "results": {"type": "array", "items": _RESULT},
        "ratios": {"type": "array", "items": _RATIO},
    },
}

SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "hsmbridge bench result",
    "type": "object",
    "required": [
        "schema", "started", "finished", "settings", "machine", "versions", "hsm", "workloads",
    ],
    "properties": {
        "schema": {"const": SCHEMA_ID},
        "started": {"type": "string"},
        "finished": {"type": "string"},
        "settings": {
            "type": "object",
            "required": ["hsm", "only", "threads", "rounds", "seconds"],
            "properties": {
                "hsm": {"type": "string"},
                "only": {"type": "string"},
                "threads": {"type": "array", "items": {"type": "integer", "minimum": 1}},
                "rounds": {"type": "integer", "minimum": 1},
                "seconds": _NUM,
            },
        },
        "machine": {
            "type": "object",
            "required": ["cpus", "platform", "processor", "python", "load_average_before",
                         "load_average_after"],
        },
        "versions": {
            "type": "object",
            "required": ["hsmbridge", "native_engine", "python_pkcs11", "cryptography", "openssl",
                         "nethsm_sdk"],
        },
        "hsm": {
            "type": "object",
            "required": ["backend", "description"],
            "properties": {"backend": {"enum": ["pkcs11", "nethsm"]}},
        },
        "workloads": {"type": "array", "items": _WORKLOAD},
    },
}  # fmt: skip
