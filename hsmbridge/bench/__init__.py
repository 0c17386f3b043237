"""``hsmbridge bench``: size an HSM and watch it for regressions (docs/benchmarks.md).

- :mod:`.workloads`: what is measured, one table row per workload;
- :mod:`.contenders`, :mod:`.pkcs11`, :mod:`.nethsm`: hsmbridge and the baselines
  it is measured against (the token's C ceiling, python-pkcs11, the nethsm SDK,
  OpenSSL);
- :mod:`.timing`, :mod:`.runner`: one measurement; rounds, thread sweep, statistics;
- :mod:`.schema`, :mod:`.report`, :mod:`.compare`: the JSON result, the table and
  HTML report, and the regression gate;
- :mod:`.environment`: the machine and versions a result was measured with;
- :mod:`.command`: the command line.
"""

from .environment import machine

__all__ = ["machine"]
