#pragma once

/// Umbrella header: everything a user of torchrev needs.

#include <torchrev/autograd/rev_stage_function.h>
#include <torchrev/memory/cpu_memory_meter.h>
#include <torchrev/recompute.h>
#include <torchrev/rev_block.h>
#include <torchrev/rev_sequential.h>
#include <torchrev/version.h>
