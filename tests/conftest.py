import os
import sys

# Verify every tangent's shape and dtype against its primal while testing.
os.environ.setdefault("FWDGRAD_CHECK", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
