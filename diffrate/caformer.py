"""DiffRate patch for timm's CAFormer (merge only, attention stages only).

The two convolution stages are untouched. In the two attention stages the tokens are carried as (B, N, C) sequences
that merging shortens; each block sorts them by the mean attention they receive and merges the least important into
their most similar survivors. Before the next downsampling, the sequence is expanded back to the full grid: every
grid position takes the feature of the merged token that contains it (tracked in a `source` matrix).

Kept numbers count tokens without a class token (CAFormer has none). The reference builds these proxies with the
class-token offset, which makes its search crash; see diffrate/README.md.
"""
import torch
import torch.nn as nn
from timm.models.metaformer import Attention as MetaFormerAttention
from timm.models.metaformer import MetaFormer, MetaFormerBlock, MetaFormerStage

from diffrate.flops import caformer_gflops, caformer_training_gflops
from diffrate.merge import merge_by_similarity, uncompress
from diffrate.proxy import KeptNumberProxy
from diffrate.vit import DiffRateModelMixin, attention_with_size, gather_tokens


class DiffRateMetaFormerAttention(MetaFormerAttention):
    def forward(self, x, size=None, mask=None):
        return attention_with_size(self, x, size, mask)


class DiffRateMetaFormerBlock(MetaFormerBlock):
    """Attention-stage block: token mixer -> residual -> sort by received attention -> merge -> MLP -> residual."""

    def introduce_diffrate(self, patch_number, merge_granularity):
        self.merge_ddp = KeptNumberProxy(patch_number, merge_granularity, class_token=False)

    def forward(self, x):
        info = self._diffrate_info
        x_mixer, attn = self.token_mixer(self.norm1(x), info['size'], info['mask'])
        order = torch.sort(attn.mean(dim=(1, 2)), descending=True)[1]
        x = self.res_scale1(x) + self.layer_scale1(self.drop_path1(x_mixer))

        x = gather_tokens(x, order)
        info['size'] = gather_tokens(info['size'], order)
        info['source'] = gather_tokens(info['source'], order)
        info['index'] = torch.gather(info['index'], 1, order)

        # the reference's merge keeps position 0 (the most important token) from receiving merges, a class-token
        # guard it applies here too although CAFormer has no class token
        if self.training:
            mask = torch.gather(info['mask'], 1, order)
            alive = info['alive']
            merge_kept = self.merge_ddp.update_kept_token_number()
            info['merge_kept_num'].append(merge_kept)
            kept = self.merge_ddp.kept_token_number
            if kept < alive:
                x_tail, size_tail, source_tail = x[:, alive:], info['size'][:, alive:], info['source'][:, alive:]
                merge, _ = merge_by_similarity(x[:, :alive].detach(), kept)
                x = torch.cat([merge(x[:, :alive], mode='mean', keep_sources=True), x_tail], dim=1)
                size = merge(info['size'][:, :alive], mode='sum', keep_sources=True)
                info['size'] = torch.cat([size, size_tail], dim=1)
                source = merge(info['source'][:, :alive], mode='amax', keep_sources=True)
                info['source'] = torch.cat([source, source_tail], dim=1)
                mask = mask * self.merge_ddp.token_mask(alive)
                alive = kept
            info['mask'] = mask
            info['alive'] = alive
        else:
            kept = self.merge_ddp.kept_token_number
            if kept < x.shape[1]:
                merge, _ = merge_by_similarity(x.detach(), kept)
                x = merge(x, mode='mean')
                info['size'] = merge(info['size'], mode='sum')
                info['source'] = merge(info['source'], mode='amax')
        x = self.res_scale2(x) + self.layer_scale2(self.drop_path2(self.mlp(self.norm2(x))))
        return x


class DiffRateMetaFormerStage(MetaFormerStage):
    """Attention stage on token sequences. Takes a grid (B, C, H, W) or the previous attention stage's compressed
    sequence, which is expanded back to its grid after the downsampling's norm (the reference's order)."""

    def _expand(self, x):
        """Compressed (B, N', C) sequence -> full (B, N, C) grid order."""
        info = self._diffrate_info
        if not self.training:
            return uncompress(x, info['source'])
        alive, index, mask = info['alive'], info['index'], info['mask']
        merged = uncompress(x[:, :alive], info['source'][:, :alive])
        B, N, C = merged.shape
        unsorted = torch.zeros((B, N, C), device=x.device, dtype=x.dtype).scatter_reduce(
            1, index.unsqueeze(-1).expand(B, N, C), x, reduce='sum')
        mask_unsorted = torch.zeros_like(mask).scatter_reduce(1, index, mask, reduce='sum')[..., None]
        # alive tokens keep their own feature (and the mask's gradient), merged-away ones take their destination's
        return mask_unsorted * unsorted + (1 - mask_unsorted) * merged

    def _downsample(self, x):
        if x.dim() == 3:
            norm, conv = self.downsample.norm, self.downsample.conv
            x = norm(x.transpose(1, 2).unsqueeze(-1)).squeeze(-1).transpose(1, 2)
            x = self._expand(x)
            B, N, C = x.shape
            side = int(round(N ** 0.5))
            return conv(x.transpose(1, 2).reshape(B, C, side, side))
        return self.downsample(x)

    def forward(self, x):
        x = self._downsample(x)
        B, C, H, W = x.shape
        x = x.reshape(B, C, -1).transpose(1, 2)
        N = H * W
        info = self._diffrate_info
        info['source'] = torch.eye(N, device=x.device)[None, ...].expand(B, N, N)
        info['size'] = torch.ones([B, N, 1], device=x.device)
        info['mask'] = torch.ones((B, N), device=x.device)
        info['index'] = torch.arange(N, device=x.device).unsqueeze(0).expand(B, N)
        info['alive'] = N
        x = self.blocks(x)
        if self._diffrate_last_stage:
            # the head average-pools: the mean over the surviving tokens, in any order (the reference's pool)
            if self.training:
                x = self._expand(x)
            if x.shape[1] == N:
                return x.transpose(1, 2).reshape(B, C, H, W)
            return x.mean(dim=1)[:, :, None, None]
        return x


class DiffRateMetaFormerMixin(DiffRateModelMixin):
    def forward(self, x, return_flop=True):
        info = self._diffrate_info
        info['prune_kept_num'] = []
        info['merge_kept_num'] = []
        x = super().forward(x)
        if not return_flop:
            return x
        flops = self.calculate_flop_training() if self.training else self.calculate_flop_inference()
        return x, flops

    def compressed_blocks(self):
        return [b for b in self.modules() if isinstance(b, DiffRateMetaFormerBlock)]

    def get_kept_num(self):
        return None, [int(b.merge_ddp.kept_token_number) for b in self.compressed_blocks()]

    def set_kept_num(self, prune_kept_numbers, merge_kept_numbers):
        """Merge numbers only. As the reference does (for fine-tuning), each block's candidate set becomes the single
        loaded number with one zero logit, so a later search forward keeps it."""
        blocks = self.compressed_blocks()
        if len(merge_kept_numbers) != len(blocks):
            raise ValueError(f'CAFormer schedule of {len(merge_kept_numbers)} merge numbers does not fit its '
                             f'{len(blocks)} attention blocks')
        for block, number in zip(blocks, merge_kept_numbers):
            proxy = block.merge_ddp
            device = proxy.selected_probability.device
            proxy.kept_token_candidate = nn.Parameter(torch.tensor([float(number)], device=device),
                                                      requires_grad=False)
            proxy.selected_probability = nn.Parameter(torch.zeros(1, device=device))
            proxy.set_kept_number(number)

    def _geometry(self):
        dims = [s.blocks[0].norm1.normalized_shape[0] for s in self.stages]
        depths = [len(s.blocks) for s in self.stages]
        return dims, depths, self.num_classes

    def calculate_flop_training(self):
        return caformer_training_gflops(*self._geometry(), self._diffrate_info['merge_kept_num']) * 1e9

    def calculate_flop_inference(self):
        return caformer_gflops(*self._geometry(), self.get_kept_num()[1]) * 1e9


def apply_caformer_patch(model: MetaFormer, prune_granularity=1, merge_granularity=1):
    """Merge proxies on every attention block except the first and last of the first attention stage and all of
    the last stage (those get a single full candidate)."""
    model.__class__ = type('DiffRate' + model.__class__.__name__, (DiffRateMetaFormerMixin, model.__class__), {})
    model._diffrate_info = {'size': None, 'mask': None, 'source': None, 'index': None, 'alive': None,
                            'prune_kept_num': [], 'merge_kept_num': []}
    attention_stages = [s for s in model.stages if isinstance(s.blocks[0].token_mixer, MetaFormerAttention)]
    if len(attention_stages) != 2:
        raise ValueError('the DiffRate CAFormer patch expects two attention stages (CAFormer)')
    grid = 224 // 16  # token grid of the first attention stage at the reference's 224 input (14 x 14, then 7 x 7)
    for stage_index, stage in enumerate(attention_stages):
        stage.__class__ = DiffRateMetaFormerStage
        stage._diffrate_info = model._diffrate_info
        stage._diffrate_last_stage = stage_index == 1
        tokens = (grid // 2 ** stage_index) ** 2
        for i, block in enumerate(stage.blocks):
            block.__class__ = DiffRateMetaFormerBlock
            block._diffrate_info = model._diffrate_info
            block.token_mixer.__class__ = DiffRateMetaFormerAttention
            if stage_index == 1 or i in (0, len(stage.blocks) - 1):
                block.introduce_diffrate(tokens, tokens + 1)
            else:
                block.introduce_diffrate(tokens, merge_granularity)
    return model
