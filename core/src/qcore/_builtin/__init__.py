"""Core's built-in plugins: layer handling (``core``) and the ``uniform`` baseline."""
