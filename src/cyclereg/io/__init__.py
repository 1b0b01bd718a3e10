"""Files in and out: images and transforms through SimpleITK (:mod:`.images`), the model grid and intensity
normalisation (:mod:`.preprocess`), pairs CSVs (:mod:`.pairs`), figures. A new output format goes in
:mod:`.images`."""
