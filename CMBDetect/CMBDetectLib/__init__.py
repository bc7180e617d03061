"""CMBDetect core: cerebral microbleed detection on SWI (Fan et al. 2022), free of Slicer and Qt.

Everything here speaks numpy arrays plus an explicit geometry; only the `mrml` package touches MRML.
"""

__version__ = "0.1.0"
