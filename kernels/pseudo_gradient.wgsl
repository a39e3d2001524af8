// theta_global - theta_local, one float32 subtraction per value (DeviceTrainer.pseudo_gradient_fp32), so that
// the fp32 upload is bit-identical to numpy's `global - local` in the PyTorch trainer.

@group(0) @binding(0) var<storage, read> global_params: array<f32>;
@group(0) @binding(1) var<storage, read> local_params: array<f32>;
@group(0) @binding(2) var<storage, read_write> out: array<f32>;
@group(0) @binding(3) var<storage, read> dims: array<u32>;  // [count, 0, 0, 0]

@compute @workgroup_size(256)
fn pseudo_gradient(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>) {
  // a 2-D grid when the vector needs more than 65535 workgroups (kernels/device.py grid_for)
  let i = gid.y * groups.x * 256u + gid.x;
  if (i < dims[0]) {
    out[i] = global_params[i] - local_params[i];
  }
}
