# 58m (dim 512, 8 layers, context 512) on one node of 4 GPUs:
# 32 sequences x 512 tokens x 4 accumulation x 4 GPUs = 262,144 tokens per iteration,
# 40,000 iterations = 10.5B tokens (about one epoch of a seq-monkey-sized corpus).
#   python prepare_data.py --input=corpus/ --vocab_size=32000     (or --tokenizer_model=.../tokenizer.model)
#   torchrun --standalone --nproc_per_node=4 pretrain.py config/pretrain_58m_4gpu.py
preset = "58m"
out_dir = "out-58m"
batch_size = 32
gradient_accumulation_steps = 4
max_iters = 40000
learning_rate = 1e-3
min_lr = 1e-4
# the schedule of the earlier defaults: the demo's warmdown recipe is measured on the CPU demo only
# (docs/experiments.md)
lr_schedule = "cosine"
embedding_lr_scale = 1.0
muon_momentum_warmup = 0
warmup_iters = 1000
eval_interval = 1000
eval_iters = 50
log_interval = 50
