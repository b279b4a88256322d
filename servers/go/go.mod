module conclab/goserver

go 1.19
