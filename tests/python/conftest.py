import os
import sys

# tests/reference.py is shared by the Python and GPU suites.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
