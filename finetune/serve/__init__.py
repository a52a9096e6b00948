"""The serving station (``samtune serve``): a checkpoint behind MONAI Label's REST protocol for 3D
Slicer and OHIF — the app and its routes (``app``), the model and its open volumes (``engine``),
the studies folder as datastore (``studies``), sessions, auth, active learning and retraining."""
