# 134m (dim 768, 12 layers, context 512) on one node of 8 GPUs:
# 32 sequences x 512 tokens x 2 accumulation x 8 GPUs = 262,144 tokens per iteration,
# 60,000 iterations = 15.7B tokens.
#   torchrun --standalone --nproc_per_node=8 pretrain.py config/pretrain_134m_8gpu.py
preset = "134m"
out_dir = "out-134m"
batch_size = 32
gradient_accumulation_steps = 2
max_iters = 60000
learning_rate = 6e-4
min_lr = 6e-5
# the schedule of the earlier defaults: the demo's warmdown recipe is measured on the CPU demo only
# (docs/experiments.md)
lr_schedule = "cosine"
embedding_lr_scale = 1.0
muon_momentum_warmup = 0
warmup_iters = 2000
eval_interval = 2000
eval_iters = 50
log_interval = 50
