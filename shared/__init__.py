"""swarmgrad's protocol: the code that every peer (coordinator, trainer, browser) runs identically.

Standard library only, so that CPython >= 3.11 and Pyodide import it alike. Never import numpy, torch
or anything outside the standard library here; tests/test_stdlib_only.py enforces it.
"""

PROTOCOL_VERSION = 1
