"""cyclereg: unsupervised deep deformable image registration with inverse and cycle consistency.

Coordinates and map conventions: :mod:`cyclereg.coords`.
"""

__version__ = "0.1.0"
