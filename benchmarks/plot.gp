# Plots of memory_bench results: run from benchmarks/results (see
# run_benchmarks.sh), after report.py has written the .tsv files.
set terminal pngcairo size 900,520 font "sans,10"
set datafile separator "\t"
set key top left
set grid ytics

set output "depth_sweep.png"
set title "Peak activation memory of a training step vs depth (RevNet-110 widths, batch 32, CPU)"
set xlabel "units per stage"
set ylabel "peak activation memory (MiB)"
# A linear axis: the stored peak grows linearly with depth, and a log axis
# would make that look exponential.
set xrange [0:*]
# One line per mode (reversible, stored, checkpointed).
plot for [c=2:4] "depth_sweep.tsv" using 1:c with linespoints lw 2 \
     title columnheader(c)
set xrange [*:*]

set output "zoo_memory_time.png"
set title "Model zoo, batch 32, CPU: peak activation memory and step time"
set style data histograms
set style histogram clustered gap 1
set style fill solid 0.8 border -1
set xtics rotate by -40 left
set ylabel "peak activation memory (MiB)"
set y2label "step time (s)"
set ytics nomirror
set y2tics
set xlabel ""
# Outside the plot area, so that the legend never covers a bar.
set key outside top center horizontal
plot "zoo.tsv" using 2:xtic(1) title "peak activation MiB" axes x1y1, \
     "" using 3 title "step seconds" axes x1y2
