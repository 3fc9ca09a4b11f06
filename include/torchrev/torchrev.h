#pragma once

/// Umbrella header: everything a user of torchrev needs.

#include <torchrev/autograd/rev_block_function.h>
#include <torchrev/checkpoint.h>
#include <torchrev/memory/cpu_memory_meter.h>
#include <torchrev/models/blocks.h>
#include <torchrev/models/nets.h>
#include <torchrev/models/zoo.h>
#include <torchrev/recompute.h>
#include <torchrev/rev_block.h>
#include <torchrev/rev_sequential.h>
#include <torchrev/version.h>
