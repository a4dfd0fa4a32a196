"""The export format: the manifest, the Hugging Face and DeciLM layouts, loading an export
(:func:`~griffin_export.formats.layout.load_pretrained`) and checking one against its
manifest and its original (verify). Never imports the pipeline that writes exports."""
