// One AdamW step over the flat parameter vector, in torch.optim.AdamW's order of operations:
// decoupled decay p *= 1 - lr*wd, m = lerp(m, g, 1-beta1), v = beta2 v + (1-beta2) g^2,
// p -= step_size * m / (sqrt(v) / sqrt(1 - beta2^t) + eps) with step_size = lr / (1 - beta1^t).
// Bias corrections are computed on the host in float64, as torch does, and arrive as f32.

struct AdamWHyper {
  lr: f32,
  beta1: f32,
  beta2: f32,
  eps: f32,
  weight_decay: f32,
  step_size: f32,
  bias_correction2_sqrt: f32,
  count: u32,
}

@group(0) @binding(0) var<storage, read_write> params: array<f32>;
@group(0) @binding(1) var<storage, read> grads: array<f32>;
@group(0) @binding(2) var<storage, read_write> exp_avg: array<f32>;
@group(0) @binding(3) var<storage, read_write> exp_avg_sq: array<f32>;
@group(0) @binding(4) var<storage, read> hyper: AdamWHyper;

@compute @workgroup_size(256)
fn adamw_step(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>) {
  let i = gid.y * groups.x * 256u + gid.x;
  if (i >= hyper.count) { return; }
  let g = grads[i];
  let p = params[i] * (1.0 - hyper.lr * hyper.weight_decay);
  let m = exp_avg[i] + (1.0 - hyper.beta1) * (g - exp_avg[i]);
  let v = exp_avg_sq[i] * hyper.beta2 + (1.0 - hyper.beta2) * g * g;
  exp_avg[i] = m;
  exp_avg_sq[i] = v;
  let denom = sqrt(v) / hyper.bias_correction2_sqrt + hyper.eps;
  params[i] = p - hyper.step_size * (m / denom);
}
