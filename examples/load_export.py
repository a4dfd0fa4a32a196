"""Load a griffin export with stock transformers and generate a few tokens.

Usage: python examples/load_export.py EXPORT_DIR
"""

import sys

from transformers import AutoModelForCausalLM, AutoTokenizer

directory = sys.argv[1]
model = AutoModelForCausalLM.from_pretrained(directory)
tokenizer = AutoTokenizer.from_pretrained(directory)
print(f"loaded {directory}: intermediate_size={model.config.intermediate_size}")

inputs = tokenizer("Rain falls when", return_tensors="pt")
output = model.generate(**inputs, max_new_tokens=24, do_sample=False)
print(tokenizer.decode(output[0], skip_special_tokens=True))
