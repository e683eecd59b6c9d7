"""Print the requirements an installed distribution declares, less extras and the names given.

Used by `make interop` to install a tool's own pins without the packages that cannot be had beside
torch 2.13 here (torchvision, torchaudio): python interop/deps.py DIST NAME...
"""
import re
import sys
from importlib.metadata import requires

dist, skip = sys.argv[1], {n.lower() for n in sys.argv[2:]}
for req in requires(dist) or []:
    name = re.match(r"[A-Za-z0-9._-]+", req).group(0).lower().replace("_", "-")
    if "extra ==" not in req and name not in skip:
        print(req)
