"""Vision towers: the vision-layer site and the signals of a tower that several families share."""
