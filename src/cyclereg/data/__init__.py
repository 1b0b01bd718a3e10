"""Training data: the 2D datasets (:mod:`.datasets`), folders of scans (:mod:`.volumes`), what they share
(:mod:`.common`) and seeded augmentation with the true map of each pair (:mod:`.augment`)."""
