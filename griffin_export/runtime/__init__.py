"""The refresh runtime: generation with an export that re-selects its experts from the full
weights every N tokens (docs/design.md, "Refresh runtime")."""
