"""arbor's ground floor: what every other package stands on, and which imports nothing of arbor's.

config (ArborConfig), errors, rope (RoPE tables and scaling), kv_layout (cache arithmetic), planner
(the memory model), tokenizer and chat_template, backend (the protocol a backend implements),
bench_rows (a benchmark row, shared with the peers). weights/ (arbor_weights), backends/
(arbor_torch, arbor_mlx) and the app (arbor_cli) import it; it imports none of them.
"""
