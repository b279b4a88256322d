module conclab/switchbench

go 1.13
