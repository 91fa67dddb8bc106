use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{AdamW, Optimizer, ParamsAdamW, VarBuilder, VarMap};
use imago::diffusion::clip::ClipTextModel;
use imago::diffusion::config::*;
use imago::diffusion::unet::UNet;
use imago::diffusion::vae::Vae;
use std::path::Path;
use std::time::Instant;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let which = args.get(1).map(|s| s.as_str()).unwrap_or("unet");
    let batch: usize = args.get(2).map(|s| s.parse().unwrap()).unwrap_or(32);
    let ch: Vec<usize> =
        args.get(3).map(|s| s.split(',').map(|x| x.parse().unwrap()).collect()).unwrap_or(vec![32, 64]);
    let latent: usize = args.get(4).map(|s| s.parse().unwrap()).unwrap_or(8);
    let hidden: usize = args.get(5).map(|s| s.parse().unwrap()).unwrap_or(32);
    let dev = Device::Cpu;
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &dev);
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    if which == "unet" {
        let n = ch.len();
        let mut down = vec!["CrossAttnDownBlock2D".to_string(); n];
        let mut up = vec!["CrossAttnUpBlock2D".to_string(); n];
        if args.get(6).map(|s| s == "plain0").unwrap_or(false) {
            down[0] = "DownBlock2D".into();
            up[n - 1] = "UpBlock2D".into();
        }
        let cfg = UNetConfig {
            in_channels: 4,
            out_channels: 4,
            block_out_channels: ch.clone(),
            down_block_types: down,
            up_block_types: up,
            layers_per_block: 1,
            attention_head_dim: Some(PerBlock::All(4)),
            num_attention_heads: None,
            cross_attention_dim: hidden,
            transformer_layers_per_block: PerBlock::All(1),
            norm_num_groups: 8,
            norm_eps: 1e-5,
            flip_sin_to_cos: true,
            freq_shift: 0,
            downsample_padding: 1,
            use_linear_projection: true,
            upcast_attention: false,
            sample_size: latent,
            addition_embed_type: None,
            addition_time_embed_dim: None,
            projection_class_embeddings_input_dim: None,
            center_input_sample: false,
            act_fn: "silu".into(),
            mid_block_type: Some("UNetMidBlock2DCrossAttn".into()),
        };
        let unet = UNet::new(vb.pp("unet"), cfg, Path::new("x"))?;
        let clip_cfg = ClipTextConfig {
            vocab_size: 49408,
            hidden_size: hidden,
            intermediate_size: hidden * 2,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            max_position_embeddings: 77,
            hidden_act: ClipActivation::QuickGelu,
            layer_norm_eps: 1e-5,
            projection_dim: None,
            architectures: vec![],
            eos_token_id: 49407,
        };
        let clip = ClipTextModel::new(vb.pp("te"), clip_cfg, Path::new("y"))?;
        let n: usize = vm.all_vars().iter().map(|v| v.elem_count()).sum();
        println!("params {n}");
        let mut opt = AdamW::new(vm.all_vars(), ParamsAdamW { lr: 1e-3, ..Default::default() })?;
        for i in 0..6 {
            let t0 = Instant::now();
            let ids: Vec<u32> = (0..batch * 77).map(|i| (i % 300) as u32).collect();
            let ids = Tensor::from_vec(ids, (batch, 77), &dev)?;
            let ctx = clip.forward(&ids, &vec![10; batch])?.last_hidden;
            let x = Tensor::randn(0f32, 1.0, (batch, 4, latent, latent), &dev)?;
            let out = unet.forward(&x, 500.0, &ctx, None)?;
            let t1 = t0.elapsed();
            let loss = (out - &x)?.sqr()?.mean_all()?;
            let g = loss.backward()?;
            let t2 = t0.elapsed();
            opt.step(&g)?;
            println!("step {i}: fwd {:?} bwd {:?} total {:?}", t1, t2, t0.elapsed());
        }
    } else {
        let n = ch.len();
        let cfg = VaeConfig {
            in_channels: 3,
            out_channels: 3,
            block_out_channels: ch.clone(),
            layers_per_block: 1,
            latent_channels: 4,
            norm_num_groups: 8,
            scaling_factor: 1.0,
            shift_factor: None,
            force_upcast: false,
            use_quant_conv: true,
            use_post_quant_conv: true,
            mid_block_add_attention: false,
            down_block_types: vec!["DownEncoderBlock2D".into(); n],
            up_block_types: vec!["UpDecoderBlock2D".into(); n],
            act_fn: "silu".into(),
            sample_size: 32,
        };
        let vae = Vae::new(vb, cfg, Path::new("v"))?;
        let n: usize = vm.all_vars().iter().map(|v| v.elem_count()).sum();
        println!("params {n}");
        let mut opt = AdamW::new(vm.all_vars(), ParamsAdamW { lr: 1e-3, ..Default::default() })?;
        for i in 0..6 {
            let t0 = Instant::now();
            let x = Tensor::randn(0f32, 1.0, (batch, 3, 32, 32), &dev)?;
            let d = vae.encode(&x)?;
            let z = (&d.mean + (&d.std * d.mean.randn_like(0.0, 1.0)?)?)?;
            let out = vae.decode(&z)?;
            let t1 = t0.elapsed();
            let loss = (out - &x)?.sqr()?.mean_all()?;
            let g = loss.backward()?;
            let t2 = t0.elapsed();
            opt.step(&g)?;
            println!("step {i}: fwd {:?} bwd {:?} total {:?}", t1, t2, t0.elapsed());
        }
    }
    let _ = Var::zeros(1, DType::F32, &dev);
    Ok(())
}
