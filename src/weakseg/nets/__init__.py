"""Networks shared by every stage that trains or runs one: ImageNet backbones (``backbones``), model
files (``model_file``: save, safe load, weight checks) and the device choice (``device``)."""
