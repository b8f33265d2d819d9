// The one place where C++ exceptions from the core become Python exceptions.
// Used by every `except +translate_exception` declaration in _core.pxd.
#pragma once

#include <Python.h>

#include <cstring>

#include <exception>
#include <new>
#include <stdexcept>

#include "mtht/errors.h"

// Sets `type` with the message decoded leniently: a message may quote bytes from a file.
static void set_error(PyObject* type, const char* message) {
  PyObject* text = PyUnicode_DecodeUTF8(message, static_cast<Py_ssize_t>(strlen(message)), "replace");
  if (text == nullptr) return;  // the decode error is set instead
  PyErr_SetObject(type, text);
  Py_DECREF(text);
}

static void translate_exception() {
  try {
    if (PyErr_Occurred()) return;  // a Python error is already set; keep it
    throw;
  } catch (const mtht::ValueError& e) {
    set_error(PyExc_ValueError, e.what());
  } catch (const mtht::KeyError& e) {
    set_error(PyExc_KeyError, e.what());
  } catch (const mtht::NotImplementedError& e) {
    set_error(PyExc_NotImplementedError, e.what());
  } catch (const mtht::IOError& e) {
    set_error(PyExc_OSError, e.what());
  } catch (const std::bad_alloc&) {
    PyErr_SetString(PyExc_MemoryError, "mtht: out of memory; the table was not changed");
  } catch (const std::invalid_argument& e) {
    set_error(PyExc_ValueError, e.what());
  } catch (const std::exception& e) {
    set_error(PyExc_RuntimeError, e.what());
  } catch (...) {
    PyErr_SetString(PyExc_RuntimeError, "mtht: unknown C++ exception");
  }
}
