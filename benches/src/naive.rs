//! GPU baselines written for the benchmark: a naive materialised attention (`S = QKᵀ`, softmax,
//! `PV` as three dispatches through an `[B·H, Nq, Nk]` f32 score buffer), an FMA peak probe and
//! a copy-bandwidth probe.

use std::time::Duration;

use wflash::wgpu::util::DeviceExt;
use wflash::{Engine, wgpu};

use crate::timing::{GpuTimer, Sample, Timing, time_submission};

const NAIVE_WGSL: &str = include_str!("../../shaders/naive_attention.wgsl");
const FMA_PEAK_WGSL: &str = include_str!("../../shaders/fma_peak.wgsl");
const READ_PEAK_WGSL: &str = include_str!("../../shaders/read_peak.wgsl");

/// Uniform block of `naive_attention.wgsl` (`struct Params`).
#[repr(C)]
#[derive(Clone, Copy, Debug, bytemuck::Pod, bytemuck::Zeroable)]
struct NaiveParams {
    q_len: u32,
    kv_len: u32,
    head_dim: u32,
    value_dim: u32,
    scale: f32,
    causal: u32,
    _pad: [u32; 2],
}

fn storage_entry(binding: u32, read_only: bool) -> wgpu::BindGroupLayoutEntry {
    wgpu::BindGroupLayoutEntry {
        binding,
        visibility: wgpu::ShaderStages::COMPUTE,
        ty: wgpu::BindingType::Buffer {
            ty: wgpu::BufferBindingType::Storage { read_only },
            has_dynamic_offset: false,
            min_binding_size: None,
        },
        count: None,
    }
}

fn compute_pipeline(
    device: &wgpu::Device,
    layout: &wgpu::PipelineLayout,
    module: &wgpu::ShaderModule,
    entry: &str,
    constants: &[(&str, f64)],
) -> wgpu::ComputePipeline {
    device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
        label: Some(entry),
        layout: Some(layout),
        module,
        entry_point: Some(entry),
        compilation_options: wgpu::PipelineCompilationOptions {
            constants,
            ..Default::default()
        },
        cache: None,
    })
}

/// Catches validation and out-of-memory errors of `f` instead of letting them escape.
fn scoped<R>(device: &wgpu::Device, f: impl FnOnce() -> R) -> Result<R, String> {
    let oom = device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
    let validation = device.push_error_scope(wgpu::ErrorFilter::Validation);
    let value = f();
    let validation = pollster::block_on(validation.pop());
    let oom = pollster::block_on(oom.pop());
    match oom.or(validation) {
        Some(err) => Err(err.to_string()),
        None => Ok(value),
    }
}

/// Submits nothing new; waits until everything submitted so far has finished.
pub fn wait(device: &wgpu::Device) -> Result<(), String> {
    device
        .poll(wgpu::PollType::wait_indefinitely())
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// The three naive pipelines, built once per device.
#[derive(Debug)]
pub struct Naive {
    bind_group_layout: wgpu::BindGroupLayout,
    scores: wgpu::ComputePipeline,
    softmax_rows: wgpu::ComputePipeline,
    pv: wgpu::ComputePipeline,
}

/// One naive problem with its buffers allocated and bound, ready to run repeatedly.
#[derive(Debug)]
pub struct NaiveRun {
    bind_group: wgpu::BindGroup,
    output: wgpu::Buffer,
    heads: u32,
    q_len: u32,
    kv_len: u32,
    value_dim: u32,
}

/// Shape of a naive problem (MHA, BHSD).
#[derive(Clone, Copy, Debug)]
pub struct NaiveShape {
    pub batch: usize,
    pub heads: usize,
    pub q_len: usize,
    pub kv_len: usize,
    pub head_dim: usize,
    pub value_dim: usize,
    pub causal: bool,
}

impl Naive {
    pub fn new(device: &wgpu::Device) -> Result<Naive, String> {
        scoped(device, || {
            let bind_group_layout =
                device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
                    label: Some("naive attention bindings"),
                    entries: &[
                        wgpu::BindGroupLayoutEntry {
                            binding: 0,
                            visibility: wgpu::ShaderStages::COMPUTE,
                            ty: wgpu::BindingType::Buffer {
                                ty: wgpu::BufferBindingType::Uniform,
                                has_dynamic_offset: false,
                                min_binding_size: None,
                            },
                            count: None,
                        },
                        storage_entry(1, true),
                        storage_entry(2, true),
                        storage_entry(3, true),
                        storage_entry(4, false),
                        storage_entry(5, false),
                    ],
                });
            let layout = device.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
                label: Some("naive attention layout"),
                bind_group_layouts: &[Some(&bind_group_layout)],
                immediate_size: 0,
            });
            let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
                label: Some("naive_attention.wgsl"),
                source: wgpu::ShaderSource::Wgsl(NAIVE_WGSL.into()),
            });
            Naive {
                scores: compute_pipeline(device, &layout, &module, "scores", &[]),
                softmax_rows: compute_pipeline(device, &layout, &module, "softmax_rows", &[]),
                pv: compute_pipeline(device, &layout, &module, "pv", &[]),
                bind_group_layout,
            }
        })
    }

    /// Bytes of the score buffer, or why the device cannot hold it.
    pub fn check_limits(device: &wgpu::Device, shape: &NaiveShape) -> Result<u64, String> {
        let limits = device.limits();
        let bytes = (shape.batch * shape.heads * shape.q_len * shape.kv_len * 4) as u64;
        let max = limits
            .max_storage_buffer_binding_size
            .min(limits.max_buffer_size);
        if bytes > max {
            return Err(format!(
                "the N×N score buffer needs {bytes} B, the device allows {max} B"
            ));
        }
        let groups = shape
            .q_len
            .div_ceil(16)
            .max(shape.kv_len.div_ceil(16))
            .max(shape.batch * shape.heads);
        if groups as u64 > u64::from(limits.max_compute_workgroups_per_dimension) {
            return Err(format!(
                "{groups} workgroups along one dimension exceed the device limit"
            ));
        }
        Ok(bytes)
    }

    /// Allocates the score and output buffers and binds them with `q`, `k`, `v` (f32, BHSD).
    pub fn prepare(
        &self,
        device: &wgpu::Device,
        shape: &NaiveShape,
        scale: f32,
        q: &wgpu::Buffer,
        k: &wgpu::Buffer,
        v: &wgpu::Buffer,
    ) -> Result<NaiveRun, String> {
        let score_bytes = Self::check_limits(device, shape)?;
        scoped(device, || {
            let params = NaiveParams {
                q_len: shape.q_len as u32,
                kv_len: shape.kv_len as u32,
                head_dim: shape.head_dim as u32,
                value_dim: shape.value_dim as u32,
                scale,
                causal: u32::from(shape.causal),
                _pad: [0; 2],
            };
            let uniform = device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: Some("naive params"),
                contents: bytemuck::bytes_of(&params),
                usage: wgpu::BufferUsages::UNIFORM,
            });
            let scores = device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("naive scores"),
                size: score_bytes,
                usage: wgpu::BufferUsages::STORAGE,
                mapped_at_creation: false,
            });
            let output = device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("naive output"),
                size: (shape.batch * shape.heads * shape.q_len * shape.value_dim * 4) as u64,
                usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC,
                mapped_at_creation: false,
            });
            let entries = [&uniform, q, k, v, &scores, &output];
            let entries: Vec<wgpu::BindGroupEntry<'_>> = entries
                .iter()
                .enumerate()
                .map(|(i, buffer)| wgpu::BindGroupEntry {
                    binding: i as u32,
                    resource: buffer.as_entire_binding(),
                })
                .collect();
            let bind_group = device.create_bind_group(&wgpu::BindGroupDescriptor {
                label: Some("naive bind group"),
                layout: &self.bind_group_layout,
                entries: &entries,
            });
            NaiveRun {
                bind_group,
                output,
                heads: (shape.batch * shape.heads) as u32,
                q_len: shape.q_len as u32,
                kv_len: shape.kv_len as u32,
                value_dim: shape.value_dim as u32,
            }
        })
    }

    /// Encodes the three dispatches and submits them as one submission (does not wait).
    pub fn submit(&self, device: &wgpu::Device, queue: &wgpu::Queue, run: &NaiveRun) {
        let mut encoder = device.create_command_encoder(&wgpu::CommandEncoderDescriptor {
            label: Some("naive attention"),
        });
        for (pipeline, groups) in [
            (
                &self.scores,
                [run.kv_len.div_ceil(16), run.q_len.div_ceil(16), run.heads],
            ),
            (&self.softmax_rows, [run.q_len.div_ceil(64), run.heads, 1]),
            (
                &self.pv,
                [
                    run.value_dim.div_ceil(16),
                    run.q_len.div_ceil(16),
                    run.heads,
                ],
            ),
        ] {
            let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: Some("naive attention"),
                timestamp_writes: None,
            });
            pass.set_pipeline(pipeline);
            pass.set_bind_group(0, &run.bind_group, &[]);
            pass.dispatch_workgroups(groups[0], groups[1], groups[2]);
        }
        queue.submit([encoder.finish()]);
    }
}

impl NaiveRun {
    /// The output buffer (f32, BHSD), for a cross-check against the fused kernel.
    pub fn output(&self) -> &wgpu::Buffer {
        &self.output
    }
}

/// Copies a whole f32 buffer back to the host.
pub fn read_f32(
    device: &wgpu::Device,
    queue: &wgpu::Queue,
    buffer: &wgpu::Buffer,
) -> Result<Vec<f32>, String> {
    let size = buffer.size();
    let staging = device.create_buffer(&wgpu::BufferDescriptor {
        label: Some("bench staging"),
        size,
        usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    });
    let mut encoder = device.create_command_encoder(&wgpu::CommandEncoderDescriptor {
        label: Some("bench readback"),
    });
    encoder.copy_buffer_to_buffer(buffer, 0, &staging, 0, size);
    queue.submit([encoder.finish()]);
    let (tx, rx) = std::sync::mpsc::channel();
    staging.map_async(wgpu::MapMode::Read, .., move |r| {
        let _ = tx.send(r.is_ok());
    });
    wait(device)?;
    if rx.recv_timeout(Duration::from_secs(60)) != Ok(true) {
        return Err("mapping the staging buffer failed".into());
    }
    let view = staging.get_mapped_range(..).map_err(|e| e.to_string())?;
    let out = bytemuck::pod_collect_to_vec::<u8, f32>(&view);
    drop(view);
    staging.unmap();
    Ok(out)
}

/// The FMA peak probe: measured f32 GFLOP/s of independent vec4 FMAs.
#[derive(Clone, Copy, Debug)]
pub struct Peak {
    pub gflops: f64,
    pub timing: Timing,
    pub flops: f64,
}

/// Loop steps per invocation: llvmpipe stops any invocation after 65535 loop iterations.
const FMA_ITERATIONS: u32 = 512;
/// FLOPs per loop step: 32 vec4 FMAs × 4 lanes × 2.
const FMA_FLOPS_PER_STEP: f64 = 256.0;
const FMA_WORKGROUP: u32 = 64;

/// The FMA probe's pipeline, with its dispatch sized once so that every run does the same work:
/// the bench runs it once before the cases, then once per round inside each group of cases, so
/// that each case's % of peak divides by the probe measured at the same time (this host's probe
/// moves by a third between minutes; docs/PERF.md).
pub struct PeakProbe {
    pipeline: wgpu::ComputePipeline,
    bind_group: wgpu::BindGroup,
    /// Workgroups per run.
    groups: u32,
}

impl PeakProbe {
    /// Compiles the probe and grows its dispatch until one run takes long enough for wall-clock
    /// timing to mean something.
    pub fn new(engine: &Engine, timer: Option<&GpuTimer>) -> Result<PeakProbe, String> {
        let device = engine.device();
        let (pipeline, bind_group) = scoped(device, || {
            let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
                label: Some("fma_peak.wgsl"),
                source: wgpu::ShaderSource::Wgsl(FMA_PEAK_WGSL.into()),
            });
            let pipeline = device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                label: Some("fma_peak"),
                layout: None,
                module: &module,
                entry_point: Some("fma_peak"),
                compilation_options: wgpu::PipelineCompilationOptions {
                    constants: &[("ITERATIONS", f64::from(FMA_ITERATIONS))],
                    ..Default::default()
                },
                cache: None,
            });
            // b < 1 and c small keep every accumulator bounded; the sentinel (-1) is never reached.
            let seed: [f32; 12] = [
                0.999, 0.999, 0.999, 0.999, 1e-3, 1e-3, 1e-3, 1e-3, -1.0, -1.0, -1.0, -1.0,
            ];
            let seed = device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: Some("fma seed"),
                contents: bytemuck::cast_slice(&seed),
                usage: wgpu::BufferUsages::STORAGE,
            });
            let sink = device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("fma sink"),
                size: 16,
                usage: wgpu::BufferUsages::STORAGE,
                mapped_at_creation: false,
            });
            let bind_group = device.create_bind_group(&wgpu::BindGroupDescriptor {
                label: Some("fma_peak"),
                layout: &pipeline.get_bind_group_layout(0),
                entries: &[
                    wgpu::BindGroupEntry {
                        binding: 0,
                        resource: seed.as_entire_binding(),
                    },
                    wgpu::BindGroupEntry {
                        binding: 1,
                        resource: sink.as_entire_binding(),
                    },
                ],
            });
            (pipeline, bind_group)
        })?;
        let mut probe = PeakProbe {
            pipeline,
            bind_group,
            groups: 64,
        };
        probe.sample(engine, timer)?; // compile and warm up
        probe.groups = 256;
        while probe.sample(engine, timer)?.wall < 0.15 && probe.groups < (1 << 22) {
            probe.groups *= 2;
        }
        Ok(probe)
    }

    /// One timed run.
    pub fn sample(&self, engine: &Engine, timer: Option<&GpuTimer>) -> Result<Sample, String> {
        let (device, queue) = (engine.device(), engine.queue());
        let max_x = device
            .limits()
            .max_compute_workgroups_per_dimension
            .min(32768);
        let (x, y) = if self.groups <= max_x {
            (self.groups, 1)
        } else {
            (max_x, self.groups.div_ceil(max_x))
        };
        let (_, sample) = time_submission(engine, timer, || {
            let mut encoder = device.create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("fma_peak"),
            });
            {
                let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
                    label: Some("fma_peak"),
                    timestamp_writes: None,
                });
                pass.set_pipeline(&self.pipeline);
                pass.set_bind_group(0, &self.bind_group, &[]);
                pass.dispatch_workgroups(x, y, 1);
            }
            queue.submit([encoder.finish()]);
            Ok(())
        })?;
        Ok(sample)
    }

    /// `samples` runs in a row.
    pub fn measure(
        &self,
        engine: &Engine,
        timer: Option<&GpuTimer>,
        samples: usize,
    ) -> Result<Peak, String> {
        let runs: Vec<Sample> = (0..samples.max(1))
            .map(|_| self.sample(engine, timer))
            .collect::<Result<_, _>>()?;
        Ok(self.peak(&runs))
    }

    /// The peak that some runs of this probe measured. `runs` must not be empty.
    pub fn peak(&self, runs: &[Sample]) -> Peak {
        let timing = Timing::of(runs);
        let flops = f64::from(self.groups)
            * f64::from(FMA_WORKGROUP)
            * f64::from(FMA_ITERATIONS)
            * FMA_FLOPS_PER_STEP;
        Peak {
            gflops: flops / timing.stats.median / 1e9,
            timing,
            flops,
        }
    }
}

/// The copy-bandwidth probe: `copy_buffer_to_buffer` of one large buffer into another.
#[derive(Clone, Copy, Debug)]
pub struct CopyBandwidth {
    /// Bytes read plus bytes written per second, in 10⁹.
    pub gbps: f64,
    /// Bytes of one copy (each is read once and written once).
    pub bytes: u64,
    pub timing: Timing,
}

/// The buffer size of the copy probe, if the device allows buffers this large.
const COPY_PROBE_BYTES: u64 = 256 << 20;
const COPY_PROBE_WARMUPS: usize = 2;

pub fn copy_bandwidth(
    engine: &Engine,
    timer: Option<&GpuTimer>,
    samples: usize,
) -> Result<CopyBandwidth, String> {
    let (device, queue) = (engine.device(), engine.queue());
    let bytes = COPY_PROBE_BYTES.min(device.limits().max_buffer_size) / wgpu::COPY_BUFFER_ALIGNMENT
        * wgpu::COPY_BUFFER_ALIGNMENT;
    let (source, destination) = scoped(device, || {
        let buffer = |label, usage| {
            device.create_buffer(&wgpu::BufferDescriptor {
                label: Some(label),
                size: bytes,
                usage,
                mapped_at_creation: false,
            })
        };
        (
            buffer("copy probe source", wgpu::BufferUsages::COPY_SRC),
            buffer("copy probe destination", wgpu::BufferUsages::COPY_DST),
        )
    })?;
    let run = || -> Result<Sample, String> {
        let (_, sample) = time_submission(engine, timer, || {
            let mut encoder = device.create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("copy probe"),
            });
            encoder.copy_buffer_to_buffer(&source, 0, &destination, 0, bytes);
            queue.submit([encoder.finish()]);
            Ok(())
        })?;
        Ok(sample)
    };
    // The first copies also pay for wgpu's lazy zeroing of both buffers and the first touch of
    // their pages.
    for _ in 0..COPY_PROBE_WARMUPS {
        run()?;
    }
    let runs: Vec<Sample> = (0..samples.max(3))
        .map(|_| run())
        .collect::<Result<_, _>>()?;
    let timing = Timing::of(&runs);
    Ok(CopyBandwidth {
        gbps: 2.0 * bytes as f64 / timing.stats.median / 1e9,
        bytes,
        timing,
    })
}

/// The shader read-bandwidth probe (shaders/read_peak.wgsl): a storage buffer read once by a
/// compute pass, in bytes read per second.
#[derive(Clone, Copy, Debug)]
pub struct ReadBandwidth {
    /// Bytes read per second, in 10⁹.
    pub gbps: f64,
    pub bytes: u64,
    pub timing: Timing,
}

/// Workgroups of the read probe: more, shorter invocations read faster on lavapipe (one run:
/// 2.8-4.1 GB/s at 256, 3.0-4.5 at 1024, 3.8-4.7 at 4096; the host's speed moves between
/// minutes, so the bench also samples the probe beside the decode cases).
const READ_PROBE_WORKGROUPS: u32 = 4096;

/// The read probe's pipeline and buffers, to sample alongside other measurements.
pub struct ReadProbe {
    pipeline: wgpu::ComputePipeline,
    bind_group: wgpu::BindGroup,
    bytes: u64,
}

impl ReadProbe {
    /// Compiles the probe and fills its buffer, once.
    pub fn new(engine: &Engine, timer: Option<&GpuTimer>) -> Result<ReadProbe, String> {
        let device = engine.device();
        let limits = device.limits();
        let bytes = COPY_PROBE_BYTES
            .min(limits.max_buffer_size)
            .min(limits.max_storage_buffer_binding_size)
            / 128
            * 128;
        let (pipeline, bind_group) = scoped(device, || {
            let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
                label: Some("read_peak.wgsl"),
                source: wgpu::ShaderSource::Wgsl(READ_PEAK_WGSL.into()),
            });
            let pipeline = device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                label: Some("read_peak"),
                layout: None,
                module: &module,
                entry_point: Some("read_peak"),
                compilation_options: Default::default(),
                cache: None,
            });
            let buffer = |label, size, usage| {
                device.create_buffer(&wgpu::BufferDescriptor {
                    label: Some(label),
                    size,
                    usage,
                    mapped_at_creation: false,
                })
            };
            let source = buffer("read probe source", bytes, wgpu::BufferUsages::STORAGE);
            let sink = buffer(
                "read probe sink",
                u64::from(READ_PROBE_WORKGROUPS) * 64 * 4,
                wgpu::BufferUsages::STORAGE,
            );
            let bind_group = device.create_bind_group(&wgpu::BindGroupDescriptor {
                label: Some("read_peak"),
                layout: &pipeline.get_bind_group_layout(0),
                entries: &[
                    wgpu::BindGroupEntry {
                        binding: 0,
                        resource: source.as_entire_binding(),
                    },
                    wgpu::BindGroupEntry {
                        binding: 1,
                        resource: sink.as_entire_binding(),
                    },
                ],
            });
            (pipeline, bind_group)
        })?;
        let probe = ReadProbe {
            pipeline,
            bind_group,
            bytes,
        };
        // The first runs also pay for compiling and for the first touch of the buffer's pages.
        for _ in 0..COPY_PROBE_WARMUPS {
            probe.sample(engine, timer)?;
        }
        Ok(probe)
    }

    /// One timed run.
    pub fn sample(&self, engine: &Engine, timer: Option<&GpuTimer>) -> Result<Sample, String> {
        let (device, queue) = (engine.device(), engine.queue());
        let (_, sample) = time_submission(engine, timer, || {
            let mut encoder = device.create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("read probe"),
            });
            {
                let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
                    label: Some("read probe"),
                    timestamp_writes: None,
                });
                pass.set_pipeline(&self.pipeline);
                pass.set_bind_group(0, &self.bind_group, &[]);
                pass.dispatch_workgroups(READ_PROBE_WORKGROUPS, 1, 1);
            }
            queue.submit([encoder.finish()]);
            Ok(())
        })?;
        Ok(sample)
    }

    /// The bandwidth of some samples.
    pub fn bandwidth(&self, samples: &[Sample]) -> ReadBandwidth {
        let timing = Timing::of(samples);
        ReadBandwidth {
            gbps: self.bytes as f64 / timing.stats.median / 1e9,
            bytes: self.bytes,
            timing,
        }
    }

    /// `samples` runs (at least 3), measured.
    pub fn measure(
        &self,
        engine: &Engine,
        timer: Option<&GpuTimer>,
        samples: usize,
    ) -> Result<ReadBandwidth, String> {
        let runs: Vec<Sample> = (0..samples.max(3))
            .map(|_| self.sample(engine, timer))
            .collect::<Result<_, _>>()?;
        Ok(self.bandwidth(&runs))
    }
}
