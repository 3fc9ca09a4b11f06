#pragma once

/// Umbrella header: everything a user of torchrev needs, with LibTorch's own
/// umbrella (optimizers, serialization, data), so that the README's snippets
/// compile with this one include.

#include <torchrev/activation_audit.h>
#include <torchrev/affine_block.h>
#include <torchrev/autograd/rev_block_function.h>
#include <torchrev/check.h>
#include <torchrev/checkpoint.h>
#include <torchrev/clone_state.h>
#include <torchrev/coupling_block.h>
#include <torchrev/drift.h>
#include <torchrev/invertible_layers.h>
#include <torchrev/invertible_module.h>
#include <torchrev/memory/cpu_memory_meter.h>
#include <torchrev/models/blocks.h>
#include <torchrev/models/nets.h>
#include <torchrev/models/transformer.h>
#include <torchrev/models/zoo.h>
#include <torchrev/recompute.h>
#include <torchrev/rev_block.h>
#include <torchrev/rev_sequential.h>
#include <torchrev/stage_mode.h>
#include <torchrev/version.h>

#include <torch/torch.h>
