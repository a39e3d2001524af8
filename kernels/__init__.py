"""WGSL kernels and a pure-Python driver that train the byte-level GPT on WebGPU (browser or native).

Standard library only, because it runs in Pyodide; never import wgpu, js or pyodide at package level.

    device = await BrowserDevice.create()          # kernels.device_browser; natively: WgpuDevice()
    trainer = DeviceTrainer(device, cfg, theta_global_f32_bytes, max_batch_size=8)   # kernels.trainer
    losses = await trainer.train_steps(batches, lr=3e-4)   # batches: [(tokens, targets)], B*T bytes each
    scales, codes = await trainer.pseudo_gradient_int8()   # theta_global - theta_local, rule in kernels.quant
    codec = DeviceSparseLoCo(device, spec, trainer.num_params)   # kernels.sparseloco_codec: residual on the GPU
    payload = await codec.encode_difference(trainer.global_params, trainer.params)   # rule in shared.compress
"""
