"""The report station: the HTML page of one or more runs (``page``), its charts and pictures
(``figures``), and the TensorBoard overlays drawn during training (``overlays``)."""
