//! Trainable weights for our model structs: a var-builder backend that creates every tensor a constructor asks
//! for as a seeded [`Var`] (so a run is reproducible from its seed), an exponential moving average of the weights,
//! and the learning-rate schedule.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Shape, Tensor, Var};
use candle_nn::init::NormalOrUniform;
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};
use imago::diffusion::noise::NoiseSource;

/// FNV-1a, so a tensor's initial values depend only on the seed and its name, never on construction order.
fn stable_hash(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ b as u64).wrapping_mul(0x0100_0000_01b3))
}

/// Initial values following candle's hints (Kaiming for weights, uniform biases, constant norms).
fn initial_values(seed: u64, shape: &Shape, name: &str, init: Init) -> Vec<f32> {
    let mut rng = NoiseSource::new(seed ^ stable_hash(name));
    let n = shape.elem_count();
    let mut uniform = |lo: f64, up: f64| -> Vec<f32> {
        (0..n).map(|_| (lo + (up - lo) * rng.next_uniform() as f64) as f32).collect()
    };
    match init {
        Init::Const(c) => vec![c as f32; n],
        Init::Uniform { lo, up } => uniform(lo, up),
        Init::Randn { mean, stdev } => {
            let mut rng = NoiseSource::new(seed ^ stable_hash(name));
            (0..n).map(|_| (mean + stdev * rng.next_normal() as f64) as f32).collect()
        }
        Init::Kaiming { dist, fan, non_linearity } => {
            let std = non_linearity.gain() / (fan.for_shape(shape).max(1) as f64).sqrt();
            match dist {
                NormalOrUniform::Uniform => uniform(-(3f64.sqrt()) * std, 3f64.sqrt() * std),
                NormalOrUniform::Normal => {
                    let mut rng = NoiseSource::new(seed ^ stable_hash(name));
                    (0..n).map(|_| (std * rng.next_normal() as f64) as f32).collect()
                }
            }
        }
    }
}

/// The weights of one component (UNet, VAE or text encoder) while it trains.
#[derive(Clone)]
pub struct TrainableWeights {
    seed: u64,
    vars: Arc<Mutex<BTreeMap<String, Var>>>,
    /// Tensors handed out as constants: they take no gradient and no optimizer step.
    frozen: Arc<HashMap<String, Tensor>>,
}

impl TrainableWeights {
    pub fn new(seed: u64, frozen: HashMap<String, Tensor>) -> Self {
        Self { seed, vars: Default::default(), frozen: Arc::new(frozen) }
    }

    /// A builder for our model constructors; every tensor they ask for becomes a var (or a frozen constant).
    pub fn var_builder(&self) -> VarBuilder<'static> {
        VarBuilder::from_backend(Box::new(self.clone()), DType::F32, Device::Cpu)
    }

    /// The vars, in name order, for the optimizer.
    pub fn vars(&self) -> Vec<Var> {
        self.lock().values().cloned().collect()
    }

    /// Trainable parameter count.
    pub fn trainable_count(&self) -> usize {
        self.lock().values().map(|v| v.elem_count()).sum()
    }

    /// Current values of every tensor (vars and frozen), detached, by safetensors name.
    pub fn snapshot(&self) -> BTreeMap<String, Tensor> {
        let mut out: BTreeMap<String, Tensor> =
            self.lock().iter().map(|(k, v)| (k.clone(), v.as_tensor().detach())).collect();
        out.extend(self.frozen.iter().map(|(k, v)| (k.clone(), v.clone())));
        out
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Var>> {
        // A poisoned lock only means another thread panicked mid-insert; the map itself is still valid.
        self.vars.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl SimpleBackend for TrainableWeights {
    fn get(&self, s: Shape, name: &str, h: Init, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        if let Some(t) = self.frozen.get(name) {
            if t.shape() != &s {
                candle_core::bail!("frozen {name} has shape {:?}, the model asks for {s:?}", t.shape());
            }
            return t.to_dtype(dtype)?.to_device(dev);
        }
        let mut vars = self.lock();
        if let Some(v) = vars.get(name) {
            return Ok(v.as_tensor().clone());
        }
        let values = Tensor::from_vec(initial_values(self.seed, &s, name, h), s, dev)?.to_dtype(dtype)?;
        let var = Var::from_tensor(&values)?;
        let tensor = var.as_tensor().clone();
        vars.insert(name.to_string(), var);
        Ok(tensor)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("cannot create {name} without a shape")
    }

    fn contains_tensor(&self, _name: &str) -> bool {
        true
    }
}

/// Exponential moving average of the trainable weights: sampling from the average is markedly cleaner than from
/// the last step's weights after a short, high-learning-rate run.
pub struct Ema {
    decay: f64,
    updates: usize,
    shadow: Vec<(String, Var, Tensor)>,
}

impl Ema {
    pub fn new(weights: &TrainableWeights, decay: f64) -> Self {
        let shadow =
            weights.lock().iter().map(|(name, var)| (name.clone(), var.clone(), var.as_tensor().detach())).collect();
        Self { decay, updates: 0, shadow }
    }

    /// Blends the current weights in; the decay ramps up over the first steps so early weights fade quickly.
    pub fn update(&mut self) -> candle_core::Result<()> {
        self.updates += 1;
        let decay = self.decay.min((1 + self.updates) as f64 / (10 + self.updates) as f64);
        for (_, var, avg) in &mut self.shadow {
            *avg = (avg.affine(decay, 0.0)? + var.as_tensor().detach().affine(1.0 - decay, 0.0)?)?;
        }
        Ok(())
    }

    /// The averaged weights by name, with the frozen tensors of `weights` added.
    pub fn weights(&self, weights: &TrainableWeights) -> BTreeMap<String, Tensor> {
        let mut out: BTreeMap<String, Tensor> = self.shadow.iter().map(|(k, _, t)| (k.clone(), t.clone())).collect();
        out.extend(weights.frozen.iter().map(|(k, v)| (k.clone(), v.clone())));
        out
    }
}

/// Linear warm-up, then cosine decay to a tenth of the peak.
pub fn learning_rate(peak: f64, step: usize, total: usize, warmup: usize) -> f64 {
    if step < warmup {
        return peak * (step + 1) as f64 / warmup as f64;
    }
    let progress = (step - warmup) as f64 / (total.saturating_sub(warmup)).max(1) as f64;
    let cosine = 0.5 * (1.0 + (std::f64::consts::PI * progress.min(1.0)).cos());
    peak * (0.1 + 0.9 * cosine)
}

/// Builds a model from plain tensors (no gradient tracking), for evaluation and inference during training.
pub fn frozen_builder(weights: &BTreeMap<String, Tensor>) -> VarBuilder<'static> {
    let map: HashMap<String, Tensor> = weights.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    VarBuilder::from_tensors(map, DType::F32, &Device::Cpu)
}

/// Mean of the last `fraction` of a loss history: the number reported as a run's final loss.
pub fn tail_mean(losses: &[f32], fraction: f64) -> f32 {
    let n = ((losses.len() as f64 * fraction).ceil() as usize).clamp(1, losses.len().max(1));
    let tail = &losses[losses.len().saturating_sub(n)..];
    tail.iter().sum::<f32>() / tail.len().max(1) as f32
}

/// Loss history reduced to at most `points` averaged (step, loss) pairs, for plots and `training.json`.
pub fn curve(losses: &[f32], points: usize) -> Vec<(f64, f64)> {
    let chunk = losses.len().div_ceil(points.max(1)).max(1);
    losses
        .chunks(chunk)
        .enumerate()
        .map(|(i, c)| ((i * chunk + c.len() / 2) as f64, c.iter().map(|&v| v as f64).sum::<f64>() / c.len() as f64))
        .collect()
}
