"""The prediction station (``samtune predict``): the run over images and volumes
(``prediction``), prompt files, propagation through a volume, and the label files it writes."""
