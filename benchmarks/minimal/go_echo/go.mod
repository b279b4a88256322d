module conclab/goecho

go 1.19
