"""The pipeline: prompt in, export out (in memory or streaming one block at a time), and the
recomputation of an export's experts from its prompt."""
