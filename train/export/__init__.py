"""Export: merge LoRA adapters into full weights, write GGUF and an Ollama Modelfile, verified.

Run as `llm-export --adapter saves/demo --out saves/demo-merged --gguf q8_0 --modelfile`.
The pipeline (`pipeline.run_export`) reads top to bottom: merge (merge.py), verify the merged
checkpoint against base+adapter (verify.py), write GGUF (gguf_writer.py) and verify it read back,
write the Modelfile (modelfile.py), then rename the finished directory into place.
"""
