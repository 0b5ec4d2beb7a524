"""The config columns the analysis reads by name: one constant per ``config.json`` field, written once.

``analysis.load_runs`` flattens each run's ``config.json`` into dotted columns (``quantizer.kind``);
every module that picks, groups or labels runs by a setting imports its name from here.
"""

KIND = "quantizer.kind"
SIZE = "quantizer.codebook_size"
TAU = "quantizer.inv_temperature"
WEIGHT = "quantizer.entropy_loss_weight"
COMMITMENT = "quantizer.commitment_loss_weight"
MODE = "quantizer.entropy_mode"
GAMMA = "quantizer.diversity_gamma"
FRAC = "quantizer.frac_per_sample_entropy"
VQ_INIT = "quantizer.vq_init"
VQ_DEAD = "quantizer.vq_dead_code_threshold"
SCHEDULE = "anneal.entropy"
SCHEDULE_START = "anneal.entropy_start"
SCHEDULE_STEPS = "anneal.entropy_steps"
STEPS = "schedule.steps"
BATCH = "data.batch_size"
RESOLUTION = "data.resolution"
PRESET = "model.preset"
DOWNSAMPLE = "model.downsample"
ADVERSARIAL = "loss.adversarial_weight"  # 0 (absent from config.json): no discriminator
SEED = "seed"
