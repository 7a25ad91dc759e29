//! [`LinearBackend`] for `Fusion<B>`: the product is registered as a custom operation in the
//! fusion stream (it ends any element-wise fusion around it) and runs the inner backend's
//! kernel when the stream is executed.

use core::marker::PhantomData;

use burn::tensor::{
    Shape,
    ops::{FloatTensor, ModuleOps},
};
use burn_fusion::{
    Fusion, FusionBackend, FusionRuntime,
    stream::{Operation, OperationStreams},
};
use burn_ir::{CustomOpIr, HandleContainer, OperationIr, OperationOutput, TensorIr};

use super::LinearBackend;

#[derive(Clone, Debug)]
struct LinearOp<B> {
    desc: CustomOpIr,
    _backend: PhantomData<B>,
}

impl<B: FusionBackend + LinearBackend> Operation<B::FusionRuntime> for LinearOp<B> {
    fn execute(
        &self,
        handles: &mut HandleContainer<<B::FusionRuntime as FusionRuntime>::FusionHandle>,
    ) {
        let inputs = &self.desc.inputs;
        let x = handles.get_float_tensor::<B>(&inputs[0]);
        let w = handles.get_float_tensor::<B>(&inputs[1]);
        let bias = inputs.get(2).map(|b| handles.get_float_tensor::<B>(b));
        let out = B::linear_skinny(x, w, bias);
        handles.register_float_tensor::<B>(&self.desc.outputs[0].id, out);
    }
}

impl<B: FusionBackend + LinearBackend> LinearBackend for Fusion<B> {
    fn linear_skinny(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: Option<FloatTensor<Self>>,
    ) -> FloatTensor<Self> {
        if !crate::kernels_enabled() {
            // Burn's own (fusable) linear.
            return <Self as ModuleOps<Self>>::linear(x, weight, bias);
        }
        let client = x.client.clone();
        let [m, _] = x.shape.dims::<2>();
        let [_, n] = weight.shape.dims::<2>();
        let dtype = x.dtype;

        let streams = match &bias {
            Some(b) => OperationStreams::with_inputs([&x, &weight, b]),
            None => OperationStreams::with_inputs([&x, &weight]),
        };
        let mut inputs = vec![x.into_ir(), weight.into_ir()];
        if let Some(b) = bias {
            inputs.push(b.into_ir());
        }
        let out = TensorIr::uninit(client.create_empty_handle(), Shape::new([m, n]), dtype);
        let desc = CustomOpIr::new("kernels::linear", &inputs, &[out]);
        client
            .register(
                streams,
                OperationIr::Custom(desc.clone()),
                LinearOp::<B> {
                    desc,
                    _backend: PhantomData,
                },
            )
            .output()
    }
}
