"""Data that ships with mcnc-format for its demo, so ``mcnc demo`` needs no download."""
