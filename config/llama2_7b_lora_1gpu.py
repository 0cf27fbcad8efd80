# LoRA on Llama 2 7B, one 80 GB GPU (A100/H100/A800/H800): the frozen base in bf16 (base_dtype auto),
# rank-8 adapters on every matrix, 4 sequences x 512 tokens per micro-step, 4 micro-steps per iteration.
# With the extended tokenizer below, the embedding and classifier train in full too. What it needs per GPU,
# and what a 24 GB card needs instead (base_dtype = "int8", checkpoint_activations = True): docs/memory.md,
# the recipe rows (python bench.py --what=memory).
#   python prepare_data.py --input=zh_corpus/ --sft_input=belle/ --extend_tokenizer=llama/tokenizer.model \
#       --vocab_size=49953 --data_dir=data-llama-zh
#   python sft.py config/llama2_7b_lora_1gpu.py
init_from = "llama/llama-2-7b"
data_dir = "data-llama-zh"
out_dir = "out-llama-zh"
lora_rank = 8
lora_alpha = 16.0
base_dtype = "auto"
block_size = 512
batch_size = 4
gradient_accumulation_steps = 4
max_iters = 3000
learning_rate = 2e-4
min_lr = 2e-5
warmup_iters = 100
replay_rows = 0  # the conversations alone, as the memory figures (docs/memory.md) count them
eval_interval = 500
