"""The cached call compiled, gpt-fast's decode step for the Eso-LM sampler: model.generate(..., net=
compiled(model)). The eager call is already at static shapes but for its width: it reads the whole
cache (L + 1 slots, a mask built from the fed tokens' slots), so torch.compile sees one shape per
number of fed tokens. This pads that number to a power of two, a few shapes in all, each one graph
(on a GPU captured as a CUDA graph, mode="reduce-overhead"). Padding is exact: a padding token goes
to the sink slot L, which no real token attends to; unlike the eager call, it computes every token.
"""
import torch
import torch.nn.functional as F


def bucket(n):  # the smallest power of two >= n
    return 1 << (n - 1).bit_length()


def compiled(model):
    """A net for model.generate: the model's cached calls, padded to a bucket and compiled, kept on
    the model so that later runs reuse its graphs (a graph per bucket and batch size)."""
    if "compiled_net" not in model.__dict__:  # a plain attribute: off the state_dict
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        mode = "reduce-overhead" if model.wte.weight.is_cuda else None
        forward = torch.compile(model, mode=mode, fullgraph=True, dynamic=False)
        L = model.config.block_size

        def net(idx, pos, mask, slots):
            W, P = idx.size(1), bucket(idx.size(1))
            idx, pos = F.pad(idx, (0, P - W), value=model.mask_id), F.pad(pos, (0, P - W))
            slots = F.pad(slots, (0, P - W), value=L)  # padding: to the sink, seeing all
            mask = F.pad(mask, (0, 0, 0, P - W), value=True)
            r = torch.arange(idx.numel(), device=idx.device)  # every token fed, for static shapes
            torch.compiler.cudagraph_mark_step_begin()  # the last call's outputs have been read
            return forward(idx, pos, mask, slots, fed=(r // P, r % P))[:, :W]

        model.__dict__["compiled_net"] = net
    return model.__dict__["compiled_net"]
