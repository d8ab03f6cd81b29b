"""qcore-detection: LiDAR 3D object detection as a qcore task (spconv layers, synthetic LiDAR, VoxelNeXt-style
detector, OpenPCDet adapter)."""

__version__ = "0.1.0"
