//! [`FlashAttentionBackend`] for `Fusion<B>`: the attention is registered as a custom operation
//! in the fusion stream (it ends any element-wise fusion around it) and runs the inner backend's
//! kernel when the stream is executed.

use core::marker::PhantomData;

use burn::tensor::{
    Shape,
    ops::{BoolTensor, FloatTensor},
};
use burn_fusion::{
    Fusion, FusionBackend, FusionRuntime,
    stream::{Operation, OperationStreams},
};
use burn_ir::{CustomOpIr, HandleContainer, OperationIr, OperationOutput, TensorIr};

use crate::{FlashAttentionBackend, FlashAttentionOptions};

#[derive(Clone, Debug)]
struct FlashAttentionOp<B> {
    desc: CustomOpIr,
    options: FlashAttentionOptions,
    _backend: PhantomData<B>,
}

impl<B: FusionBackend + FlashAttentionBackend> Operation<B::FusionRuntime> for FlashAttentionOp<B> {
    fn execute(
        &self,
        handles: &mut HandleContainer<<B::FusionRuntime as FusionRuntime>::FusionHandle>,
    ) {
        let inputs = &self.desc.inputs;
        let q = handles.get_float_tensor::<B>(&inputs[0]);
        let k = handles.get_float_tensor::<B>(&inputs[1]);
        let v = handles.get_float_tensor::<B>(&inputs[2]);
        let mask = inputs.get(3).map(|m| handles.get_bool_tensor::<B>(m));
        let out = B::flash_attention(q, k, v, mask, self.options);
        handles.register_float_tensor::<B>(&self.desc.outputs[0].id, out);
    }
}

impl<B: FusionBackend + FlashAttentionBackend> FlashAttentionBackend for Fusion<B> {
    fn flash_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        tree_mask: Option<BoolTensor<Self>>,
        options: FlashAttentionOptions,
    ) -> FloatTensor<Self> {
        let client = q.client.clone();
        let [batch, n_heads, q_len, head_dim] = q.shape.dims::<4>();
        let dtype = q.dtype;

        let streams = match &tree_mask {
            Some(mask) => OperationStreams::with_inputs([&q, &k, &v, mask]),
            None => OperationStreams::with_inputs([&q, &k, &v]),
        };
        let mut inputs = vec![q.into_ir(), k.into_ir(), v.into_ir()];
        if let Some(mask) = tree_mask {
            inputs.push(mask.into_ir());
        }
        let out = TensorIr::uninit(
            client.create_empty_handle(),
            Shape::new([batch, n_heads, q_len, head_dim]),
            dtype,
        );
        let desc = CustomOpIr::new("kernels::flash_attention", &inputs, &[out]);
        client
            .register(
                streams,
                OperationIr::Custom(desc.clone()),
                FlashAttentionOp::<B> {
                    desc,
                    options,
                    _backend: PhantomData,
                },
            )
            .output()
    }
}
