"""Running a model on the ranks of a job: the public API (llama.py), the engine and its rank protocol
(engine.py), the model's math (model.py), where its matrices live (projection.py, memory.py), how a
decode step runs (decode.py), making the model (loading.py), sampling, tokenizer and chat format."""
