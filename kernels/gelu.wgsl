// tanh-approximate GELU, forward and backward, elementwise over a flat buffer.
// tanh is built from exp because some backends compute tanh from sinh/cosh, which overflow to NaN.

struct ElementwiseDims {
  count: u32,
  pad0: u32,
  pad1: u32,
  pad2: u32,
}

@group(0) @binding(0) var<storage, read> pre: array<f32>;
@group(0) @binding(1) var<storage, read_write> out: array<f32>;
@group(0) @binding(2) var<storage, read> dims: ElementwiseDims;

const SQRT_2_OVER_PI: f32 = 0.7978845608028654;
const GELU_CUBIC: f32 = 0.044715;

fn stable_tanh(z: f32) -> f32 {
  let e = exp(2.0 * clamp(z, -40.0, 40.0));
  return 1.0 - 2.0 / (e + 1.0);
}

// Large buffers need a 2-D grid (at most 65535 workgroups per axis); this flattens it back.
fn flat_index(gid: vec3<u32>, groups: vec3<u32>) -> u32 {
  return gid.y * groups.x * 256u + gid.x;
}

@compute @workgroup_size(256)
fn gelu_forward(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>) {
  let i = flat_index(gid, groups);
  if (i >= dims.count) { return; }
  let u = pre[i];
  let t = stable_tanh(SQRT_2_OVER_PI * (u + GELU_CUBIC * u * u * u));
  out[i] = 0.5 * u * (1.0 + t);
}

// out holds dL/d(gelu output) and becomes dL/d(gelu input), in place.
@compute @workgroup_size(256)
fn gelu_backward(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>) {
  let i = flat_index(gid, groups);
  if (i >= dims.count) { return; }
  let u = pre[i];
  let t = stable_tanh(SQRT_2_OVER_PI * (u + GELU_CUBIC * u * u * u));
  let d_inner = SQRT_2_OVER_PI * (1.0 + 3.0 * GELU_CUBIC * u * u);
  out[i] = out[i] * (0.5 * (1.0 + t) + 0.5 * u * (1.0 - t * t) * d_inner);
}
