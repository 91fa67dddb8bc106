use candle_core::{DType, Device, Module, Tensor, Var};
use std::time::Instant;
fn main() -> anyhow::Result<()> {
    let dev = Device::Cpu;
    let vm = candle_nn::VarMap::new();
    let vb = candle_nn::VarBuilder::from_varmap(&vm, DType::F32, &dev);
    let (b, c, hw) = (16usize, 16usize, 32usize);
    let gn = candle_nn::group_norm(8, c, 1e-6, vb.pp("gn"))?;
    let conv = candle_nn::conv2d(c, c, 3, candle_nn::Conv2dConfig { padding: 1, ..Default::default() }, vb.pp("c"))?;
    let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, c, hw, hw), &dev)?)?;
    let time = |name: &str, f: &dyn Fn() -> candle_core::Result<Tensor>| -> anyhow::Result<()> {
        let t = Instant::now();
        for _ in 0..5 {
            let y = f()?;
            let _ = y.sum_all()?;
        }
        let fwd = t.elapsed() / 5;
        let t = Instant::now();
        for _ in 0..5 {
            let y = f()?;
            let _ = y.sqr()?.sum_all()?.backward()?;
        }
        println!("{name}: fwd {fwd:?} fwd+bwd {:?}", t.elapsed() / 5);
        Ok(())
    };
    time("groupnorm", &|| gn.forward(x.as_tensor()))?;
    time("silu", &|| x.as_tensor().silu())?;
    time("conv", &|| conv.forward(x.as_tensor()))?;
    time("add", &|| x.as_tensor() + x.as_tensor())?;
    time("upsample", &|| x.as_tensor().upsample_nearest2d(64, 64))?;
    time("pad", &|| x.as_tensor().pad_with_zeros(3, 0, 1)?.pad_with_zeros(2, 0, 1))?;
    Ok(())
}
