# LoRA on Llama 2 7B over 4 GPUs of 24 GB or more (RTX 3090/4090, A10, L4 x4): FSDP shards the bf16 base,
# the adapters and their AdamW state over the 4 processes, and activation checkpointing keeps one block's
# activations at a time. 4 sequences x 512 tokens per GPU per micro-step, 64 sequences per iteration.
# Memory per GPU at this shape with the extended tokenizer (the embedding and classifier trained in full):
# docs/memory.md, the recipe rows. Host RAM: only rank 0 reads the base, one copy while loading; the other
# processes receive their shards (docs/memory.md, host RAM when loading).
#   torchrun --standalone --nproc_per_node=4 sft.py config/llama2_7b_lora_fsdp_4gpu.py
init_from = "llama/llama-2-7b"
data_dir = "data-llama-zh"
out_dir = "out-llama-zh"
fsdp = True
checkpoint_activations = True
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
