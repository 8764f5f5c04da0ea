"""Print the installed packages whose version differs from the lock (make test-latest).

python requirements/newer.py requirements/cpu.lock FREEZE_FILE
"""

import re
import sys


def pins(path: str) -> dict[str, str]:
    out = {}
    for line in open(path):
        match = re.match(r"^([A-Za-z0-9._-]+)==(\S+)", line)
        if match:
            out[re.sub(r"[-_.]+", "-", match.group(1)).lower()] = match.group(2)
    return out


locked, installed = pins(sys.argv[1]), pins(sys.argv[2])
changed = [
    f"  {name}: {locked.get(name, 'not in the lock')} -> {version}"
    for name, version in sorted(installed.items())
    if locked.get(name) != version
]
print("\n".join(changed) if changed else "  none: the newest releases are the locked ones")
