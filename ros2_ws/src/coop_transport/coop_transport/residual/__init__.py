"""Cooperative residual RL on frozen π0 policies (seed paper §3.3-3.4, section 4): architectures B1-V6.

Modules, in reading order:
    architectures  the six architectures as data (``get_arch``)
    config         ``ResidualConfig``: every hyperparameter, with the paper's defaults
    networks       RL token encoder, message head and decoder, FiLM, residual actor, twin Q and V
    losses         expectile, TD, AWR, message supervision, KL
    buffers        chunk transitions, FIFO online buffer, RLPD 50/50 sampler
    system         π0 + agents at a chunk boundary, batched over environments
    update         one ``update(batch) -> metrics`` per agent (IQL + AWR)
    demos          demonstration buffer and RL-token encoder pre-training
    rollout        environment workers (processes or Ray), collection, batched evaluation
    checkpoint     safetensors + JSON policy checkpoints and resumable training state
    train          the training loop (``train``, ``run``)
    policy         the evaluation-registry controller and the ROS ``ArmPolicy`` of trained agents
    probes         communication probes and linear probes of the message (V5, V6)
    report         Table 1, Table 2, plots and the paired V4-V5 test

Command lines: ``training/residual.py``, ``training/report.py``, ``bench/residual_speed.py``.
Importing this package imports nothing heavy.
"""
