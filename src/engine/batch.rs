//! Compatible generate jobs run as one pipeline call: same model, size, steps, scheduler and guidance, each job
//! with its own prompts (from the embedding cache) and seeds. The model computes every image as it would alone
//! (see [`crate::diffusion::batch`]), so a job's images are byte-identical whether it ran alone or in company.
//!
//! A job of a batch that is cancelled or passes its deadline stops the shared loop; it gets its own error and
//! the others run again without it (a re-run reports its steps from 1 again). Private jobs never share a call.

use std::sync::Arc;
use std::time::Instant;

use super::faults::generate_in_chunks;
use super::{diffusion_error, encode_output, job_request, random_seed, Engine, JobControl, JobOutput};
use crate::diffusion::batch::{BatchPart, PromptEmbeddings};
use crate::diffusion::model::DiffusionModel;
use crate::diffusion::pipeline::{GenerateParams, Generated, StepProgress, MAX_BATCH};
use crate::diffusion::schedulers::SchedulerKind;
use crate::diffusion::{Error as DiffusionError, Result as DiffusionResult};
use crate::job::{ErrorCode, JobError, JobKind, JobSpec};

/// One job of a batch handed to [`crate::engine::JobRunner::run_batch`].
pub struct BatchJob<'a> {
    pub spec: &'a JobSpec,
    pub control: &'a JobControl,
    pub on_step: &'a mut dyn FnMut(StepProgress),
}

/// What jobs must share to run as one pipeline call.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchKey {
    model: String,
    size: Option<(u32, u32)>,
    steps: Option<u32>,
    scheduler: Option<SchedulerKind>,
    guidance: Option<f64>,
}

/// The key of a job that may share a pipeline call; `None` for jobs that always run alone: edits, private jobs and
/// sealed ones (whose prompts are only opened with their inputs).
pub fn batch_key(spec: &JobSpec) -> Option<BatchKey> {
    (spec.kind == JobKind::Generate && !spec.private && spec.sealed.is_none()).then(|| BatchKey {
        model: spec.model.clone(),
        size: spec.size,
        steps: spec.steps,
        scheduler: spec.scheduler,
        guidance: spec.guidance,
    })
}

/// Groups jobs (their keys and image counts, in arrival order) into pipeline calls of at most `max_images` images:
/// jobs with equal keys join the earliest group that has room, every other job is a group of its own. Groups are
/// ordered by their first job; each lists job indices in arrival order.
pub fn plan_batches(jobs: &[(Option<BatchKey>, u32)], max_images: u32) -> Vec<Vec<usize>> {
    let mut groups: Vec<(Option<&BatchKey>, u32, Vec<usize>)> = Vec::new();
    for (index, (key, images)) in jobs.iter().enumerate() {
        let joinable = key
            .as_ref()
            .and_then(|key| groups.iter_mut().find(|(k, used, _)| *k == Some(key) && used + images <= max_images));
        match joinable {
            Some((_, used, members)) => {
                *used += images;
                members.push(index);
            }
            None => groups.push((key.as_ref(), *images, vec![index])),
        }
    }
    groups.into_iter().map(|(_, _, members)| members).collect()
}

/// How one attempt at running the pending jobs together ended.
enum Together {
    Done(Vec<Result<JobOutput, JobError>>),
    /// Some job asked to stop: drop it and run the rest again.
    Stopped,
    /// The jobs cannot (or could not) share a call: run each alone.
    Apart,
    /// The device is lost: every job fails with this.
    Failed(JobError),
}

impl Engine {
    /// Runs generate jobs as one pipeline call where they are compatible (see [`batch_key`]); returns one result
    /// per job, in order. Jobs that cannot share a call, or a batch that ran out of device memory, run one by one.
    /// Blocking: call it from a blocking thread.
    pub fn run_batch(&self, jobs: &mut [BatchJob]) -> Vec<Result<JobOutput, JobError>> {
        let mut results: Vec<Option<Result<JobOutput, JobError>>> = jobs.iter().map(|_| None).collect();
        if let Err(e) = self.health.ensure_usable() {
            return jobs.iter().map(|_| Err(e.clone())).collect();
        }
        // Seeds are drawn once, so a re-run gives the images the first run would have.
        let seeds: Vec<u64> = jobs.iter().map(|j| j.spec.seed.unwrap_or_else(random_seed)).collect();
        let mut pending: Vec<usize> = (0..jobs.len()).collect();
        while !pending.is_empty() {
            pending.retain(|&i| match stop_error(jobs[i].control) {
                Some(e) => {
                    results[i] = Some(Err(e));
                    false
                }
                None => true,
            });
            if pending.len() > 1 {
                match self.run_together(jobs, &pending, &seeds) {
                    Together::Done(outputs) => {
                        for (&i, output) in pending.iter().zip(outputs) {
                            results[i] = Some(output);
                        }
                        pending.clear();
                    }
                    Together::Stopped => continue,
                    Together::Failed(e) => {
                        for &i in &pending {
                            results[i] = Some(Err(e.clone()));
                        }
                        pending.clear();
                    }
                    Together::Apart => {}
                }
            }
            for i in pending.drain(..) {
                let job = &mut jobs[i];
                let spec = JobSpec { seed: Some(seeds[i]), ..job.spec.clone() };
                results[i] = Some(self.run(&spec, &Default::default(), job.control, &mut *job.on_step));
            }
        }
        let lost = || JobError::new(ErrorCode::Internal, "the batch ended without a result for this job");
        results.into_iter().map(|r| r.unwrap_or_else(|| Err(lost()))).collect()
    }

    /// One pipeline call for the `pending` jobs.
    fn run_together(&self, jobs: &mut [BatchJob], pending: &[usize], seeds: &[u64]) -> Together {
        let started = Instant::now();
        let Some(first) = pending.first().map(|&i| &jobs[i]) else { return Together::Done(Vec::new()) };
        let key = batch_key(first.spec);
        if key.is_none() || pending.iter().any(|&i| batch_key(jobs[i].spec) != key) {
            return Together::Apart;
        }
        let Ok(model) = self.models.get(&first.spec.model) else { return Together::Apart };
        let _turn = self.device_access.shared();
        // Each job's own parameters (its seed and image count); the rest must agree once defaults are filled in.
        let params = pending
            .iter()
            .map(|&i| model.params(job_request(jobs[i].spec, seeds[i])))
            .collect::<DiffusionResult<Vec<_>>>();
        let Ok(params) = params else { return Together::Apart };
        let images: usize = params.iter().map(|p| p.batch).sum();
        if images > MAX_BATCH || params.iter().any(|p| !shares_call(p, &params[0])) {
            return Together::Apart;
        }
        let encode_started = Instant::now();
        let prompts = pending
            .iter()
            .map(|&i| self.prompt_embeddings(&model, jobs[i].spec, &params[0]))
            .collect::<DiffusionResult<Vec<_>>>();
        let Ok(prompts) = prompts else { return Together::Apart };
        let text_encode = encode_started.elapsed();
        let parts: Vec<BatchPart> = prompts
            .iter()
            .zip(&params)
            .map(|(prompts, p)| BatchPart { prompts, seed: p.seed, images: p.batch })
            .collect();
        let shared = GenerateParams { batch: images, ..params[0].clone() };
        let mut on_step = |p: StepProgress| {
            for &i in pending {
                (jobs[i].on_step)(p);
            }
            !pending.iter().any(|&i| jobs[i].control.stop_requested())
        };
        let generated = model.generate_batch(&shared, &parts, &mut on_step);
        let mut generated = match generated {
            Ok(generated) => generated,
            Err(DiffusionError::Cancelled) if pending.iter().any(|&i| jobs[i].control.stop_requested()) => {
                return Together::Stopped
            }
            Err(e) => {
                let error = self.health.observe::<()>(Err(diffusion_error(e, &JobControl::default())));
                return match error {
                    Err(e) if self.health.lost().is_some() => Together::Failed(e),
                    _ => Together::Apart,
                };
            }
        };
        generated.timings.text_encode += text_encode;
        tracing::debug!(jobs = pending.len(), images, "ran a batch of jobs as one pipeline call");
        let mut offset = 0;
        let outputs = pending
            .iter()
            .zip(&params)
            .map(|(&i, p)| {
                let own = rows_of(&generated, offset, p.batch);
                offset += p.batch;
                own.and_then(|own| encode_output(jobs[i].spec, p, &own, started))
            })
            .collect();
        Together::Done(outputs)
    }

    /// The job's prompts encoded for `model`, through the embedding cache unless the job is private.
    pub(super) fn prompt_embeddings(
        &self,
        model: &DiffusionModel,
        spec: &JobSpec,
        params: &GenerateParams,
    ) -> DiffusionResult<Arc<PromptEmbeddings>> {
        let (prompt, negative_prompt) = (spec.prompt.expose(), spec.negative_prompt.expose());
        self.embeddings.embeddings(model, prompt, negative_prompt, params.guidance > 1.0, spec.private)
    }

    /// Text-to-image for one job, its prompts through the embedding cache, split on out-of-memory.
    pub(super) fn generate_one(
        &self,
        model: &DiffusionModel,
        spec: &JobSpec,
        params: &GenerateParams,
        on_step: &mut dyn FnMut(StepProgress) -> bool,
    ) -> DiffusionResult<Generated> {
        let started = Instant::now();
        let prompts = self.prompt_embeddings(model, spec, params)?;
        let text_encode = started.elapsed();
        let mut generated = generate_in_chunks(params, |p| {
            model.generate_batch(p, &[BatchPart { prompts: &prompts, seed: p.seed, images: p.batch }], on_step)
        })?;
        generated.timings.text_encode += text_encode;
        Ok(generated)
    }
}

/// Whether two jobs' parameters can share a pipeline call (everything but prompts, seed and image count).
fn shares_call(a: &GenerateParams, b: &GenerateParams) -> bool {
    (a.width, a.height, a.steps, a.scheduler) == (b.width, b.height, b.steps, b.scheduler) && a.guidance == b.guidance
}

/// The error of a job that must not (continue to) run.
fn stop_error(control: &JobControl) -> Option<JobError> {
    if control.past_deadline() {
        Some(JobError::new(ErrorCode::DeadlineExceeded, "the job's deadline passed while it waited or ran"))
    } else if control.cancel.load(std::sync::atomic::Ordering::SeqCst) {
        Some(JobError::new(ErrorCode::Cancelled, "cancelled"))
    } else {
        None
    }
}

/// Images `offset..offset + count` of a batch's result.
fn rows_of(generated: &Generated, offset: usize, count: usize) -> Result<Generated, JobError> {
    let rows = |t: &candle_core::Tensor| t.narrow(0, offset, count);
    let split = || -> candle_core::Result<Generated> {
        Ok(Generated {
            images: rows(&generated.images)?,
            initial_noise: rows(&generated.initial_noise)?,
            final_latents: rows(&generated.final_latents)?,
            truncated_tokens: generated.truncated_tokens,
            timings: generated.timings.clone(),
        })
    };
    split().map_err(|e| JobError::new(ErrorCode::Internal, format!("splitting the batch failed: {e}")))
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;
    use std::sync::{Arc, Mutex};
    use std::time::SystemTime;

    use super::*;
    use crate::diffusion::hub::HubOptions;
    use crate::diffusion::input::InputLimits;
    use crate::diffusion::model::LoadOptions;
    use crate::diffusion::tiny::{write_tiny_model, TinyFamily, TinyOptions};
    use crate::engine::{EngineConfig, ModelDirectory};
    use crate::job::{JobLimits, JobMessage};

    type JobResult = Result<JobOutput, JobError>;

    fn engine() -> (tempfile::TempDir, Engine) {
        let dir = tempfile::tempdir().unwrap();
        let options = TinyOptions { family: TinyFamily::Sd15, seed: 0, fp16_variant: false };
        write_tiny_model(&dir.path().join("sd15"), options).unwrap();
        let hub = HubOptions { offline: true, ..HubOptions::from_env() };
        let models = ModelDirectory { models_dir: Some(dir.path().to_path_buf()), default_model: None, hub };
        let config = EngineConfig { models, load: LoadOptions::cpu(), input_limits: InputLimits::default() };
        (dir, Engine::new(config))
    }

    /// A guided two-step job on the ancestral sampler (fresh per-image noise every step).
    fn job(id: &str, prompt: &str, seed: u64, images: u32) -> JobSpec {
        let message = JobMessage {
            model: "sd15".into(),
            steps: Some(2),
            guidance: Some(5.0),
            seed: Some(seed),
            scheduler: Some("euler-a".into()),
            batch: images,
            ..JobMessage::generate(id, prompt)
        };
        crate::job::validate(message, &JobLimits::default()).unwrap()
    }

    /// Runs `specs` as one batch; `on_step(job, step, control)` sees every step of every job. Returns the results
    /// and the order in which the jobs' steps were reported.
    fn run_batch(
        engine: &Engine,
        specs: &[JobSpec],
        controls: &[JobControl],
        on_step: impl Fn(usize, usize, &JobControl),
    ) -> (Vec<JobResult>, Vec<(usize, usize)>) {
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut callbacks: Vec<Box<dyn FnMut(StepProgress)>> = (0..specs.len())
            .map(|i| {
                let (order, control, on_step) = (order.clone(), controls[i].clone(), &on_step);
                Box::new(move |p: StepProgress| {
                    order.lock().unwrap().push((i, p.step));
                    on_step(i, p.step, &control);
                }) as Box<dyn FnMut(StepProgress)>
            })
            .collect();
        let mut jobs: Vec<BatchJob> = specs
            .iter()
            .zip(controls)
            .zip(callbacks.iter_mut())
            .map(|((spec, control), on_step)| BatchJob { spec, control, on_step: on_step.as_mut() })
            .collect();
        let results = engine.run_batch(&mut jobs);
        drop(jobs);
        drop(callbacks);
        let order = order.lock().unwrap().clone();
        (results, order)
    }

    fn alone(engine: &Engine, spec: &JobSpec) -> Vec<Vec<u8>> {
        engine.run(spec, &Default::default(), &JobControl::default(), &mut |_| {}).unwrap().images
    }

    fn controls(n: usize) -> Vec<JobControl> {
        (0..n).map(|_| JobControl::default()).collect()
    }

    #[test]
    fn batched_jobs_give_byte_identical_images_to_running_alone() {
        let (_dir, engine) = engine();
        let specs = [job("a", "a red circle", 7, 1), job("b", "a blue square", 100, 2), job("c", "", 3, 1)];
        let (results, order) = run_batch(&engine, &specs, &controls(3), |_, _, _| {});
        // One loop: every step reaches all three jobs before the next step starts.
        assert_eq!(order, [(0, 1), (1, 1), (2, 1), (0, 2), (1, 2), (2, 2)]);
        for (spec, result) in specs.iter().zip(results) {
            let output = result.unwrap();
            assert_eq!(output.seeds, (0..spec.batch as u64).map(|i| spec.seed.unwrap() + i).collect::<Vec<_>>());
            assert!(output.images == alone(&engine, spec), "job {} differs from its run alone", spec.id);
        }
    }

    #[test]
    fn cancelling_one_job_of_a_batch_runs_the_others_again_without_it() {
        let (_dir, engine) = engine();
        let specs = [job("a", "a red circle", 7, 1), job("b", "a blue square", 8, 1), job("c", "a cat", 9, 1)];
        let cancel_b = |job: usize, _step: usize, control: &JobControl| {
            if job == 1 {
                control.cancel.store(true, Ordering::SeqCst);
            }
        };
        let (results, order) = run_batch(&engine, &specs, &controls(3), cancel_b);
        // Step 1 of all three, then a fresh run of a and c from step 1.
        assert_eq!(order, [(0, 1), (1, 1), (2, 1), (0, 1), (2, 1), (0, 2), (2, 2)]);
        let mut results = results.into_iter();
        assert!(results.next().unwrap().unwrap().images == alone(&engine, &specs[0]));
        assert_eq!(results.next().unwrap().err().map(|e| e.code), Some(ErrorCode::Cancelled));
        assert!(results.next().unwrap().unwrap().images == alone(&engine, &specs[2]));
    }

    #[test]
    fn a_job_past_its_deadline_fails_and_its_companion_runs_alone() {
        let (_dir, engine) = engine();
        let specs = [job("a", "a red circle", 7, 1), job("b", "a blue square", 8, 1)];
        let mut controls = controls(2);
        controls[0].deadline = Some(SystemTime::UNIX_EPOCH);
        let (results, order) = run_batch(&engine, &specs, &controls, |_, _, _| {});
        assert_eq!(results[0].as_ref().err().map(|e| e.code), Some(ErrorCode::DeadlineExceeded));
        assert!(results[1].as_ref().unwrap().images == alone(&engine, &specs[1]));
        assert_eq!(order, [(1, 1), (1, 2)]);
    }

    #[test]
    fn jobs_that_differ_in_more_than_prompt_and_seed_run_one_by_one() {
        let (_dir, engine) = engine();
        let three_steps = JobSpec { steps: Some(3), ..job("b", "a blue square", 8, 1) };
        let specs = [job("a", "a red circle", 7, 1), three_steps];
        let (results, order) = run_batch(&engine, &specs, &controls(2), |_, _, _| {});
        assert!(results.iter().all(|r| r.is_ok()));
        assert_eq!(order, [(0, 1), (0, 2), (1, 1), (1, 2), (1, 3)]);
    }

    #[test]
    fn plans_group_equal_keys_within_the_image_limit_and_keep_others_apart() {
        let a = batch_key(&job("a", "x", 1, 1));
        let other_model = batch_key(&JobSpec { model: "other".into(), ..job("b", "x", 1, 1) });
        let private = batch_key(&JobSpec { private: true, ..job("p", "x", 1, 1) });
        assert!(private.is_none(), "private jobs are never batched");
        let jobs = [(a.clone(), 1), (other_model, 1), (a.clone(), 2), (None, 1), (a.clone(), 2), (a, 1)];
        assert_eq!(plan_batches(&jobs, 4), vec![vec![0, 2, 5], vec![1], vec![3], vec![4]]);
        assert_eq!(plan_batches(&jobs[..1], 1), vec![vec![0]]);
    }

    #[test]
    fn prompts_are_encoded_once_for_repeats_and_never_kept_for_private_jobs() {
        let (_dir, engine) = engine();
        let public = job("a", "a red circle", 7, 1);
        alone(&engine, &public);
        alone(&engine, &JobSpec { id: "again".into(), ..public.clone() });
        let stats = engine.embedding_cache_stats();
        assert_eq!((stats.entries, stats.hits, stats.misses), (1, 1, 1));
        let private = JobSpec { private: true, ..job("p", "a private prompt", 7, 1) };
        alone(&engine, &private);
        alone(&engine, &JobSpec { private: true, ..public });
        assert_eq!(engine.embedding_cache_stats(), stats, "private jobs neither read nor write the cache");
    }
}
