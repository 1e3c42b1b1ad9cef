"""Entry points: one absl `main()` per command; the only modules that read FLAGS."""

import os

# TensorFlow's C++ INFO lines (CPU feature notes, oneDNN) drown the tools' own output; warnings and
# errors still show. Set before any entry point imports TensorFlow; a user's own setting wins.
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '1')
